"""`flux-server serve`'s start-up checks (server/supervisor/preflight.py): refused
configurations, the banner; each before any child process starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.config import Settings
from server.supervisor.gpus import plan_workers
from server.supervisor.preflight import ConfigError, banner, check_not_serving_noise, check_settings
from server.supervisor.serve import serve
from server.tls import make_certificates

REPO = Path(__file__).resolve().parents[3]


def settings(**kwargs: object) -> Settings:
    return Settings(_env_file=None, **kwargs)  # type: ignore[call-arg]


@pytest.fixture(autouse=True)
def no_flux_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FLUX_"):
            monkeypatch.delenv(name)


# --------------------------------------------------------------------------- checks


def test_non_loopback_host_without_keys_is_refused() -> None:
    with pytest.raises(ConfigError, match="--insecure-no-auth"):
        check_settings(settings(host="0.0.0.0"))
    check_settings(settings(host="0.0.0.0", insecure_no_auth=True))
    check_settings(settings(host="0.0.0.0", api_key=["k1"]))
    check_settings(settings(host="::1"))
    check_settings(settings(host="localhost"))


def test_keys_file_counts_as_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nabc\n")
    check_settings(settings(host="0.0.0.0", api_keys_file=keys))
    with pytest.raises(ConfigError, match="no such file"):
        check_settings(settings(api_keys_file=tmp_path / "missing"))


def test_half_configured_tls_is_refused(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path, [])
    with pytest.raises(ConfigError, match="both --ssl-certfile and --ssl-keyfile"):
        check_settings(settings(ssl_certfile=paths.cert))
    with pytest.raises(ConfigError, match="both"):
        check_settings(settings(ssl_keyfile=paths.key))
    with pytest.raises(ConfigError, match="no such file"):
        check_settings(settings(ssl_certfile=tmp_path / "nope.pem", ssl_keyfile=paths.key))
    check_settings(settings(ssl_certfile=paths.cert, ssl_keyfile=paths.key))


def test_serve_exits_2_with_a_message_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    assert serve(settings(host="0.0.0.0", data_dir=data)) == 2
    assert "refusing to listen on 0.0.0.0" in capsys.readouterr().err
    assert not data.exists()  # nothing was started or created

    assert serve(settings(model=str(tmp_path / "no-such-model"), data_dir=data)) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "does not exist" in err

    empty = tmp_path / "empty-model"
    empty.mkdir()
    assert serve(settings(model=str(empty), data_dir=data)) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_the_tiny_model_by_default_on_a_public_address_is_refused() -> None:
    """A forgotten --model must never put the tiny model's noise in front of a studio."""
    with pytest.raises(ConfigError, match="tiny test model") as refused:
        check_not_serving_noise(settings(host="0.0.0.0", api_key=["k"]))
    assert "--model" in str(refused.value) and "0.0.0.0" in str(refused.value)
    # Named on purpose (a flag or FLUX_MODEL), real weights, or a loopback address: allowed.
    check_not_serving_noise(settings(host="0.0.0.0", api_key=["k"], model="tiny"))
    check_not_serving_noise(settings(host="0.0.0.0", api_key=["k"], model="/srv/weights/FLUX.1-dev"))
    check_not_serving_noise(settings(host="127.0.0.1"))
    check_not_serving_noise(settings(host="localhost"))


def test_flux_model_tiny_in_the_environment_counts_as_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUX_MODEL", "tiny")
    check_not_serving_noise(settings(host="0.0.0.0", api_key=["k"]))


def test_serve_refuses_the_default_tiny_model_on_a_public_address_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    assert serve(settings(host="0.0.0.0", api_key=["k"], data_dir=data)) == 2
    assert "refusing to serve the tiny test model" in capsys.readouterr().err
    assert not data.exists()  # nothing was started or created


def test_cli_serve_refuses_the_default_tiny_model_in_a_real_process(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "server.supervisor.cli", "serve", "--host", "0.0.0.0"]
    argv += ["--api-key", "k", "--data-dir", str(tmp_path / "data")]
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLUX_")}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "refusing to serve the tiny test model" in proc.stderr and "--model tiny" in proc.stderr


def test_cli_serve_refuses_public_host_in_a_real_process(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.supervisor.cli",
            "serve",
            "--host",
            "0.0.0.0",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "--api-key" in proc.stderr and "--insecure-no-auth" in proc.stderr
    assert time.monotonic() - started < 30  # no worker was started


# --------------------------------------------------------------------------- banner


def test_banner_tells_how_to_point_fal_client(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path, [])
    on = settings(port=8443, ssl_certfile=paths.cert, ssl_keyfile=paths.key, api_key=["k"])
    slots = plan_workers(on, gpus=["0", "1"])
    text = banner(on, slots)
    assert "https://127.0.0.1:8443" in text
    assert "FAL_QUEUE_RUN_HOST=127.0.0.1:8443" in text
    assert "FAL_RUN_HOST=127.0.0.1:8443/run" in text
    assert "SSL_CERT_FILE=" in text
    assert "auth     on" in text and "TLS      on" in text
    assert "w0 on cuda:0" in text and "w1 on cuda:1" in text
    off = banner(settings(), plan_workers(settings(), gpus=[]))
    assert "http://127.0.0.1:8000" in off and "auth     off" in off and "TLS      off" in off


# --------------------------------------------------------------------------- Triton's toolchain


def test_gpu_workers_with_compiled_presets_are_told_what_triton_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sysconfig

    from server.supervisor.preflight import check_toolchain

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no gcc, no clang
    monkeypatch.delenv("CC", raising=False)
    paths = sysconfig.get_paths()
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {**paths, "include": str(tmp_path)})
    gpus = plan_workers(settings(device="cuda"), gpus=["0", "1"])
    warning = check_toolchain(settings(device="cuda"), gpus)
    assert warning is not None
    assert warning.startswith("the compiled presets (regular, high) will run eager on the GPU workers")
    assert "a C compiler" in warning and "apt-get install gcc" in warning and "python3-dev" in warning
    # Nothing compiled, or no GPU: nothing to say.
    assert check_toolchain(settings(device="cuda", presets=["none"]), gpus) is None
    assert check_toolchain(settings(device="cpu"), plan_workers(settings(device="cpu"))) is None
    # Everything there: nothing to say either.
    (tmp_path / "Python.h").write_text("")
    compiler = tmp_path / "empty" / "gcc"
    compiler.parent.mkdir()
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    assert check_toolchain(settings(device="cuda"), gpus) is None


def test_variants_are_checked_before_any_worker_starts(tmp_path: Path) -> None:
    from server.supervisor.gpus import WorkerSlot
    from server.supervisor.preflight import check_variants

    slots = [WorkerSlot("w0", None), WorkerSlot("w1", None)]
    check_variants(settings(model="tiny"), slots)  # every tiny variant, built by the workers
    with pytest.raises(ConfigError, match=r"--variant: variant 'fill': the path does not exist"):
        check_variants(settings(model="tiny", variants={"fill": str(tmp_path / "missing")}), slots)
    with pytest.raises(ConfigError, match="--pin-variants / --worker-variants name krea2"):
        check_variants(settings(model="tiny", pin_variants=["krea2"]), slots)
    with pytest.raises(ConfigError, match="no worker of this box serves kontext, tiny-finetune"):
        only = {"w0": ["dev", "fill"], "w1": ["krea"]}
        check_variants(settings(model="tiny", worker_variants=only), slots)
    check_variants(settings(model="tiny", worker_variants={"w0": ["dev", "fill"]}), slots)  # w1 serves all
    # A fine-tune named like fal's own namespace or a route of the server is unreachable.
    with pytest.raises(ConfigError, match=r"--variant fal-ai: 'fal-ai' is reserved"):
        check_variants(settings(model="tiny", variants={"fal-ai": "tiny"}), slots)


def test_serve_refuses_a_broken_variant_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = {"kontext": "black-forest-labs/FLUX.1-Kontext-dev"}
    assert serve(settings(model="tiny", variants=broken, data_dir=tmp_path / "data")) == 2
    err = capsys.readouterr().err
    assert (
        "variant 'kontext'" in err
        and "never downloads" in err
        and "fetch_weights.py --variant kontext" in err
    )


def test_a_broken_keys_file_stops_the_start_with_its_reason(tmp_path):
    (tmp_path / "keys.json").write_text('{"keys": [{"name": "a", "sha256": "nothex"}]}')
    with pytest.raises(ConfigError, match="64 hex digits"):
        check_settings(settings(data_dir=tmp_path))
