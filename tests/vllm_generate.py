"""Run in a subprocess by the tests: greedy generation + log-probs with vLLM (CPU).

usage: python tests/vllm_generate.py MODEL_DIR IN.json OUT.json
IN.json: {"prompts": [...], "max_tokens": N}; OUT.json: [{"text", "token_ids", "logprobs"}].
"""
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    model_dir, inp, out = sys.argv[1:4]
    req = json.load(open(inp))
    llm = LLM(model=model_dir, enforce_eager=True, max_model_len=1024, dtype="float32", seed=0)
    sp = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], logprobs=1)
    res = []
    for o in llm.generate(req["prompts"], sp):
        c = o.outputs[0]
        res.append({"text": c.text, "token_ids": list(c.token_ids),
                    "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]})
    json.dump(res, open(out, "w"))
