"""Runs and job ids (issue 13, point 1): one run identity per run, shared by its ranks and sent
with CreateJob; a fresh run starts from an empty density, a second live run is refused, a
resumed run continues."""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp

import ddp_worker
from conftest import RUN_TAKEOVER_AFTER
import ghmd.torch
from ghmd import GhmdError
from ghmd.torch import GHMC
from mmdet_port import PortGHMC
from test_checkpoint import assert_replayed, losses
from test_torch_losses import batches_c


def identities(tmp_path, name):
    out = tmp_path / name
    out.mkdir()
    mp.spawn(ddp_worker.identity, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"identity{rank}.pt") for rank in range(2)]


def test_one_run_identity_per_run_shared_by_every_rank(tmp_path):
    ranks = identities(tmp_path, "run")
    assert ranks[0]["first"] == ranks[0]["again"], "drawn once per run"
    assert ranks[0]["first"] == ranks[1]["first"] == ranks[1]["again"]
    assert ghmd.torch.run_identity() != ranks[0]["first"], "this process is another run"


@pytest.fixture
def new_run(monkeypatch):
    """Starts another run in this process: the next loss draws a new identity."""
    def start():
        monkeypatch.setattr(ghmd.torch, "_RUN", None)
    start()
    return start


def test_a_fresh_run_on_a_used_job_id_starts_from_an_empty_density(address, job_id, new_run):
    batches = list(batches_c(seed=21, steps=3))
    first = GHMC(bins=30, momentum=0.75, job_id=job_id, address=address)
    losses(first, batches)
    first.close()
    # The next run of the same config, once the first has been quiet past --run-takeover-after.
    time.sleep(RUN_TAKEOVER_AFTER + 0.5)
    new_run()
    second = GHMC(bins=30, momentum=0.75, job_id=job_id, address=address)
    assert_replayed(losses(PortGHMC(bins=30, momentum=0.75), batches), losses(second, batches))
    second.close()


def test_two_live_runs_on_one_job_id_are_an_error(address, job_id, new_run):
    batch = next(batches_c(seed=22, steps=1))
    first = GHMC(bins=30, momentum=0.75, job_id=job_id, address=address)
    first(*batch)
    new_run()
    second = GHMC(bins=30, momentum=0.75, job_id=job_id, address=address)
    with pytest.raises(GhmdError) as error:
        second(*batch)
    assert job_id in error.value.message and "run" in error.value.message
    first(*batch)  # the live run goes on
    first.close()
    second.close()


def test_a_resumed_run_continues_from_its_checkpoint(address, job_id, new_run):
    batches = list(batches_c(seed=23, steps=6))
    first = GHMC(bins=30, momentum=0.75, job_id=job_id, address=address)
    losses(first, batches[:3])
    checkpoint = first.state_dict()
    continued = losses(first, batches[3:])
    first.close()
    new_run()
    resumed = GHMC(bins=30, momentum=0.75, job_id=job_id, address=address)
    resumed.load_state_dict(checkpoint)
    assert_replayed(continued, losses(resumed, batches[3:]))
    resumed.close()
