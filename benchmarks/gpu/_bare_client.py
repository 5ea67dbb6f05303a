"""Import `pipeweaver.client.*` submodules without running `pipeweaver/client/__init__.py`.

That `__init__` also imports the gRPC planner client (grpc, protobuf), which the GPU image does not have; the
benchmarks need only the executor, the models and the data. Import this module before any `pipeweaver.client`.
"""

import sys
import types
from pathlib import Path

import pipeweaver

if "pipeweaver.client" not in sys.modules:
    _pkg = types.ModuleType("pipeweaver.client")
    _pkg.__path__ = [str(Path(pipeweaver.__file__).resolve().parent / "client")]
    sys.modules["pipeweaver.client"] = _pkg
