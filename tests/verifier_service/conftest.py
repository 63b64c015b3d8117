"""A verifier engine (TP=1, no gRPC) over the module's own tiny `folder` checkpoint."""
import pytest

from common.config import EngineConfig
from common.engine.tp_executor import TPExecutor
from verifier_service.engine import VerifierEngine


@pytest.fixture()
def engine(folder):
    ex = TPExecutor(EngineConfig(model=folder, dtype="float32", num_kv_blocks=256))
    eng = VerifierEngine(ex, k_max=8, max_queue=64)
    yield eng
    eng.shutdown()
    ex.shutdown()
