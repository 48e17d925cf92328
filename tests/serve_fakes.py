"""The test double of the awake endpoint's unit tests (tests/test_serve_api.py, tests/test_serve_tenants.py).

``FakeEngine`` is the only fake engine of the suite: the seed model's real tokenizer,
canned generations and scores, so that the FastAPI app, validation, tenants and the
adapter pointer can be driven in milliseconds. The MemoryStore, the SleepController and
the sleeps behind it are real. The real engine and Ray Serve are in tests/test_serve.py.
"""
import json
import time

import pytest
from fastapi.testclient import TestClient

from sleepray.adapter_pointer import WARMUP_PROMPT
from sleepray.awake import AwakeService
from sleepray.awake_backends import LocalBackends
from sleepray.config import load_config
from sleepray.engines.base import Engine, GenDelta, GenResult, ScoreResult
from sleepray.memory import MemoryStore
from sleepray.serve_app import build_app
from sleepray.storage import Storage

MAX_LEN = 128


class FakeEngine(Engine):
    """Test double (unit tests only): real tokenizer, canned outputs, records its inputs."""
    kind = "fake"

    def __init__(self, model_dir, cfg):
        super().__init__(str(model_dir), cfg)
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.prompts, self.loaded, self.unloaded, self.used = [], [], [], []
        self.gate = None   # a threading.Event that generate waits on, when set
        self.after_first = None   # one that a streamed generation waits on after its first delta

    def generate(self, requests, on_delta=None):
        if self.gate is not None and requests[0].prompt != WARMUP_PROMPT:
            self.gate.wait(10)
        out = []
        for i, r in enumerate(requests):
            p = self._prepare_gen(r)
            self.prompts.append(r.prompt)
            self.used.append(r.adapter)
            ids = list(self.tokenizer(" Paris is nice", add_special_tokens=False)["input_ids"])[: p.max_tokens]
            topk = [[(i, -0.1)] * r.logprobs_topk for i in ids] if r.logprobs_topk else None
            out.append(GenResult(self.tokenizer.decode(ids), ids, [-0.5] * len(ids), topk, r.adapter,
                                 "length"))
            sent = ""
            for j in range(len(ids) if on_delta else 0):   # one token a delta
                text = self.tokenizer.decode(ids[: j + 1])
                on_delta(i, GenDelta(text[len(sent):], ids[j: j + 1], [-0.5], time.time(),
                                     j == len(ids) - 1, "length" if j == len(ids) - 1 else None))
                sent = text
                if j == 0 and self.after_first is not None:
                    self.after_first.wait(10)
        return out

    def score(self, requests):
        res = []
        for r in requests:
            p = self._prepare_score(r)
            res.append(ScoreResult(p.cont_ids, [-1.0] * len(p.cont_ids),
                                   [[(t, -1.0)] for t in p.cont_ids] if r.logprobs_topk else None))
        return res

    def load_adapter(self, name, path):
        self._adapters[name] = self._check_adapter_folder(path)
        self.loaded.append(name)

    def unload_adapter(self, name):
        del self._adapters[name]
        self.unloaded.append(name)

    def close(self):
        pass


def _cfg(tmp_path, *extra):
    return load_config(None, [f"cycle.storage={tmp_path}", f"engine.max_model_len={MAX_LEN}",
                              "serve.max_tokens_limit=32", "serve.rate_limit_rps=0", *extra])


def _publish(storage, name):
    """A version folder as sleep.publish_version lays it out (files only; FakeEngine reads none)."""
    d = storage / "adapters" / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.safetensors").write_bytes(b"")
    (d / "lineage.json").write_text(json.dumps({"metrics": {"loss": 0.1}, "episodes": []}))
    return d


@pytest.fixture
def made(tmp_path, seed_test_model):
    def make(*extra):
        cfg = _cfg(tmp_path, *extra)
        engine = FakeEngine(seed_test_model, cfg.engine)
        svc = AwakeService(cfg, engine, LocalBackends(cfg, sleep=_real_sleep, watch=False), tmp_path)
        for t in svc.tenants.values():
            t.pointer.poll_once()
        client = TestClient(build_app(svc), raise_server_exceptions=False)
        return svc, client, MemoryStore(Storage(tmp_path).memory), engine
    return make


def _sleeper(svc, tenant="default"):
    return svc.tenants[tenant].control.sleeper


def _real_sleep(cfg, storage, trigger):
    from sleepray.sleep import run_sleep
    rec = run_sleep(cfg, storage, trigger=trigger, only=["nrem"], progress=False)
    return rec.data if rec is not None else None


