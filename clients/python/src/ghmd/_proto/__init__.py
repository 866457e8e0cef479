"""Stubs generated from proto/ghm/v1/ghm.proto by tools/gen_stubs.py; do not edit by hand."""
