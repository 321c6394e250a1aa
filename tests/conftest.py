import pytest
import torch

from sdtm_compile.models import TINY_SD3, TINY_SD35, example_inputs, tiny_sd3_transformer


@pytest.fixture(scope="session", autouse=True)
def _engine_cache(tmp_path_factory):
    """One engine cache for the session, away from the user's ~/.cache (cold at the start of every run)."""
    import os

    os.environ["SDTM_CACHE_DIR"] = str(tmp_path_factory.mktemp("engine_cache"))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def sd3():
    return TINY_SD3, tiny_sd3_transformer(TINY_SD3, seed=0)


@pytest.fixture(scope="session")
def sd35():
    return TINY_SD35, tiny_sd3_transformer(TINY_SD35, seed=1)


@pytest.fixture(params=["sd3", "sd35"])
def tiny_model(request):
    return request.getfixturevalue(request.param)


__all__ = ["example_inputs"]
