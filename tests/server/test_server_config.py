"""`pipeweaver serve` options: flags win over PIPEWEAVER_* variables, and bad values fail with one line."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from pipeweaver.server.config import ConfigError, ServerConfig, add_arguments, from_args
from tests.server.harness import ROOT, serve_until_exit


def parse(argv: list[str], env: dict[str, str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(argv), env or {})


def test_defaults_suit_a_sidecar() -> None:
    cfg = parse([])
    assert cfg.host == "127.0.0.1" and cfg.port == 50051 and cfg.metrics_port == 9464
    assert cfg.tls is None and cfg.reflection and not cfg.follower and cfg.search_workers >= 1
    assert cfg.control_workers >= 1


def test_environment_fills_in_and_flags_win() -> None:
    env = {"PIPEWEAVER_PORT": "6000", "PIPEWEAVER_METRICS_PORT": "6001", "PIPEWEAVER_WORKERS": "3"}
    cfg = parse(["--port", "7000"], env)
    assert (cfg.port, cfg.metrics_port, cfg.search_workers) == (7000, 6001, 3)
    cfg = parse([], {"PIPEWEAVER_MAX_MICROBATCHES": "16", "PIPEWEAVER_REFLECTION": "off"})
    assert cfg.limits.max_microbatches == 16 and not cfg.reflection
    cfg = parse(["--control-workers", "2"], {"PIPEWEAVER_CONTROL_WORKERS": "3"})
    assert cfg.control_workers == 2
    cfg = parse(["--compare-baselines", "1f1b,zb-h1"])
    assert cfg.compare_baselines == ("1f1b", "zb-h1")
    assert parse([], {"PIPEWEAVER_SEARCH_NICE": "10"}).search_nice == 10


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--port", "x"], {}, "--port"),
        ([], {"PIPEWEAVER_PORT": "seventy"}, "PIPEWEAVER_PORT"),
        (["--port", "70000"], {}, "port must be in 0..65535"),
        (["--workers", "0"], {}, "search workers must be at least 1"),
        ([], {"PIPEWEAVER_CONTROL_WORKERS": "0"}, "control workers must be at least 1"),
        (["--search-nice", "20"], {}, "search nice must be in 0..19, got 20"),
        (["--budget-ms", "-1"], {}, "budget must be positive"),
        (["--compare-baselines", "fastest"], {}, "unknown baseline"),
        (["--tls-cert", "/nonexistent.pem"], {}, "TLS needs both"),
        (["--tls-client-ca", "/nonexistent.pem"], {}, "mutual TLS is TLS plus"),
        (["--reflection", "maybe"], {}, "expected true or false"),
        (["--max-media", "0"], {}, "max media per microbatch must be at least 1"),
        (["--leader", "nohost"], {}, "leader must be host:port"),
    ],
)
def test_bad_options_name_themselves(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(argv, env)


def test_tls_files_must_exist(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="no such file"):
        parse(["--tls-cert", str(cert), "--tls-key", str(tmp_path / "missing.pem")])


def test_the_command_reports_a_bad_option_in_one_line() -> None:
    result = serve_until_exit("--port", "x", timeout_s=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pipeweaver: error: --port: invalid literal for int() with base 10: 'x'"
    ]


def test_the_command_reports_a_busy_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = serve_until_exit("--port", str(port), "--metrics-port", "0", "--workers", "1")
    assert result.returncode == 1
    assert f"cannot bind 127.0.0.1:{port}" in result.stderr


def test_workers_never_import_grpc() -> None:
    code = (
        "import sys, pipeweaver.server.work; assert not any(m == 'grpc' or m.startswith('grpc.') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=ROOT)
