"""Issue 15.9: third-party noise hidden unless --verbose; our own lines untouched."""

import os
import warnings

from alp_agent.app.cli import build_parser
from alp_agent.app.progress import quiet_third_party


def test_quiet_hides_third_party_warnings_and_bars(monkeypatch):
    for k in ("TQDM_DISABLE", "VLLM_LOGGING_LEVEL", "TORCH_CPP_LOG_LEVEL"):
        monkeypatch.setenv(k, "")  # recorded, so the test's values are undone afterwards
        monkeypatch.delenv(k)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn_explicit("old api", FutureWarning, "x.py", 1, module="vllm.triton_utils")
        warnings.warn_explicit("ours", UserWarning, "y.py", 1, module="alp_agent.train")
    assert [str(w.message) for w in seen] == ["ours"]
    assert os.environ["TQDM_DISABLE"] == "1" and os.environ["VLLM_LOGGING_LEVEL"] == "ERROR"
    assert os.environ["TORCH_CPP_LOG_LEVEL"] == "ERROR"


def test_verbose_flag_on_train_and_globally():
    p = build_parser()
    assert p.parse_args(["train", "--verbose"]).verbose is True
    assert p.parse_args(["-v", "train"]).verbose is True
    assert p.parse_args(["train"]).verbose is False
