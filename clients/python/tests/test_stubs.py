"""The committed stubs are exactly what grpcio-tools makes of the repository's proto, and the
package builds into a wheel that carries them."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile

from conftest import CLIENT_ROOT

spec = importlib.util.spec_from_file_location("gen_stubs", CLIENT_ROOT / "tools" / "gen_stubs.py")
gen_stubs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen_stubs)


def test_committed_stubs_match_the_proto(tmp_path):
    gen_stubs.generate(tmp_path)
    for name in gen_stubs.GENERATED:
        fresh = (tmp_path / name).read_text()
        committed = (gen_stubs.STUB_DIR / name).read_text()
        assert fresh == committed, (
            f"src/ghmd/_proto/{name} differs from what proto/ghm/v1/ghm.proto generates: "
            "run `python clients/python/tools/gen_stubs.py` and commit the result"
        )


def test_stubs_describe_the_contract():
    from ghmd import ghm_pb2

    service = ghm_pb2.DESCRIPTOR.services_by_name["Harmonizer"]
    assert ghm_pb2.DESCRIPTOR.package == "ghm.v1"
    assert {method.name for method in service.methods} >= {
        "CreateJob", "GetJob", "ListJobs", "DeleteJob", "UpdateJob", "RestoreJob",
        "Harmonize", "HarmonizeStream",
    }


def test_wheel_is_ghmd_client_with_the_stubs(tmp_path):
    # Built from a copy: setuptools leaves build/ and *.egg-info beside the sources.
    source = tmp_path / "source"
    shutil.copytree(
        CLIENT_ROOT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path), str(source)],
        check=True,
    )
    (wheel,) = tmp_path.glob("ghmd_client-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("__init__.py", "client.py", "errors.py", "torch.py", "mmdet.py",
                   "_proto/ghm_pb2.py", "_proto/ghm_pb2_grpc.py", "_proto/ghm_pb2.pyi"):
        assert f"ghmd/{module}" in names, f"ghmd/{module} missing from {wheel.name}"
    assert not any(name.startswith("tests/") for name in names)
