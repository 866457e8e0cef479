"""The client's token and TLS against a real ghmd run with --tokens-file and --tls-cert: the
bearer token opens exactly its job prefixes, and the torch losses pass both through."""

from __future__ import annotations

import grpc
import pytest
import torch

from conftest import Server
from ghmd import Client, GhmdError, TLSConfig
from ghmd.torch import GHMC
from test_client import self_signed

TOKEN = "team-a-0123456789abcdef"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    directory = tmp_path_factory.mktemp("secured")
    key, cert = self_signed(directory)
    tokens = directory / "tokens.toml"
    tokens.write_text(
        f'[[token]]\nname = "team-a"\ntoken = "{TOKEN}"\nprefixes = ["team-a/"]\n'
    )
    tokens.chmod(0o600)
    server = Server(
        directory / "ghmd.log",
        "--tokens-file", str(tokens), "--tls-cert", str(cert), "--tls-key", str(key),
        credentials=grpc.ssl_channel_credentials(cert.read_bytes()),
    )
    try:
        server.wait_serving()
        yield server.address.replace("127.0.0.1", "localhost"), cert
    finally:
        server.stop()


def test_token_and_tls_reach_a_secured_server(secured):
    address, cert = secured
    with Client(address, token=TOKEN, tls=TLSConfig(ca=cert)) as client:
        client.create_job("team-a/job", "ghm_c", bins=4)
        assert client.harmonize("team-a/job", [0.1, 0.9]).nonempty_bins == 2
        with pytest.raises(GhmdError) as error:
            client.create_job("team-b/job", "ghm_c")
        assert error.value.code == grpc.StatusCode.PERMISSION_DENIED

    with Client(address, tls=TLSConfig(ca=cert), retries=0) as anonymous:
        with pytest.raises(GhmdError) as error:
            anonymous.get_job("team-a/job")
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(address, token="not-" + TOKEN, tls=TLSConfig(ca=cert), retries=0) as wrong:
        with pytest.raises(GhmdError) as error:
            wrong.get_job("team-a/job")
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_torch_loss_with_token_and_tls(secured):
    address, cert = secured
    loss = GHMC(bins=10, momentum=0.75, job_id="team-a/loss", address=address, token=TOKEN,
                tls=TLSConfig(ca=cert))
    pred = torch.randn(50, 3, requires_grad=True)
    loss(pred, (torch.rand(50, 3) < 0.1).float(), torch.ones(50, 3)).backward()
    assert pred.grad is not None and loss.last_result.step == 0
    assert loss.state_dict()["steps"] == 1
    loss.close()
