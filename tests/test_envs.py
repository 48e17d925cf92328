import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

from sleepray.envs import FewShotRulesEnv, KnowledgeStreamEnv, register_envs
from sleepray.qa import normalize
from sleepray.world import World

SMALL = dict(world_seed=3, n_episodes=3, people_per_episode=2, questions_per_episode=3)


def _contains(text: str, answer: str) -> bool:
    return f" {normalize(answer)} " in f" {normalize(text)} "


def _run(env, seed=None, answer_fn=lambda obs, info: "x"):
    obs, info = env.reset(seed=seed)
    trace = []
    while True:
        action = answer_fn(obs, info)
        nobs, r, term, trunc, ninfo = env.step(action)
        trace.append((obs, info, action, r, ninfo))
        assert not trunc
        obs, info = nobs, ninfo
        if term:
            return trace, obs, info


def _gold(env, obs, info):
    ep = env.world.episode(info["episode"])
    [probe] = [p for p in ep.probes if p.question == obs]
    assert (probe.entity, probe.attribute) == (info["entity"], info["attribute"])
    return probe.answer


@pytest.mark.parametrize("env", [KnowledgeStreamEnv(**SMALL), FewShotRulesEnv(seed=1, n_tasks=4)])
def test_check_env(env):
    check_env(env, skip_render_check=True)


def test_stream_structure():
    env = KnowledgeStreamEnv(**SMALL)
    trace, last_obs, last_info = _run(env)
    world = World(3, 2, 1, 1, 2)
    kinds = [(i["kind"], i["episode"]) for _, i, *_ in trace]
    expected = []
    for e in range(3):
        expected += [("document", e)] * len(world.episode(e).documents)
        expected += [("question", e)] * 3
        if e >= 1:
            expected += [("question", e - 1)] * 3
    assert kinds == expected
    docs = [o for o, i, *_ in trace if i["kind"] == "document"]
    assert docs == [d for e in range(3) for d in world.episode(e).documents]
    for obs, info, _, r, _ in trace:
        assert info["episode_id"] == f"w3-e{info['episode']}"
        assert env.observation_space.contains(obs)
        if info["kind"] == "document":
            assert r == 0.0
    assert last_obs == "" and last_info["kind"] == "end"
    with pytest.raises(RuntimeError):
        env.step("x")


def test_question_block_has_distinct_facts():
    env = KnowledgeStreamEnv(**SMALL)
    trace, *_ = _run(env)
    qs = [(i["episode"], i["entity"], i["attribute"]) for _, i, *_ in trace if i["kind"] == "question"]
    for b in range(0, len(qs), 3):
        assert len(set(qs[b:b + 3])) == 3


def test_correct_answer_rewarded_wrong_not_and_no_leak():
    env = KnowledgeStreamEnv(**SMALL)
    obs, info = env.reset()
    prev_gold, n_q, turn = None, 0, 0
    while True:
        if info["kind"] == "question":
            gold = _gold(env, obs, info)
            # nothing before the step gives the answer away
            assert not _contains(obs, gold)
            assert info.get("answer", prev_gold) == prev_gold   # only last step's answer
            for k, v in info.items():
                if k != "answer":
                    assert not _contains(str(v), gold), (k, v, gold)
            correct = turn % 2 == 0
            action = f"The {gold.upper()}." if correct else "no idea"  # EM normalises case/punct
            turn += 1
            obs, r, term, _, info = env.step(action)
            assert r == (1.0 if correct else 0.0)
            assert info["answer"] == gold and info["exact_match"] == r
            assert info["f1"] == (1.0 if correct else 0.0)
            prev_gold, n_q = gold, n_q + 1
        else:
            assert "answer" not in info or info["answer"] == prev_gold
            obs, r, term, _, info = env.step("ignored")
            assert r == 0.0 and "answer" not in info
            prev_gold = None
        if term:
            break
    assert n_q == 3 * 5


def test_partial_answer_f1():
    env = KnowledgeStreamEnv(world_seed=0, people_per_episode=1, orgs_per_episode=1,
                             places_per_episode=0, n_episodes=1, questions_per_episode=10)
    obs, info = env.reset()
    while True:
        if info["kind"] == "question" and len(_gold(env, obs, info).split()) > 1:
            gold = _gold(env, obs, info)
            _, r, _, _, info2 = env.step(gold.split()[0])
            assert r == 0.0 and 0.0 < info2["f1"] < 1.0
            return
        obs, _, term, _, info = env.step("x")
        assert not term, "no multi-word answer found"


def test_determinism_and_reseed():
    a = [(o, i) for o, i, *_ in _run(KnowledgeStreamEnv(**SMALL))[0]]
    b = [(o, i) for o, i, *_ in _run(KnowledgeStreamEnv(**SMALL))[0]]
    assert a == b
    c = [(o, i) for o, i, *_ in _run(KnowledgeStreamEnv(**SMALL), seed=123)[0]]
    d = [(o, i) for o, i, *_ in _run(KnowledgeStreamEnv(**SMALL), seed=123)[0]]
    assert c == d
    # reseeding changes only the questions, never the documents
    docs = lambda run: [(o, i["episode"]) for o, i in run if i["kind"] == "document"]
    assert docs(a) == docs(c)
    assert [x for x in a if x[1]["kind"] == "question"] != [x for x in c if x[1]["kind"] == "question"]
    other = [(o, i) for o, i, *_ in _run(KnowledgeStreamEnv(**{**SMALL, "world_seed": 4}))[0]]
    assert other != a


def test_question_delay_zero():
    env = KnowledgeStreamEnv(**{**SMALL, "question_delay": 0})
    trace, *_ = _run(env)
    qs = [i["episode"] for _, i, *_ in trace if i["kind"] == "question"]
    assert qs == [0] * 3 + [1] * 3 + [2] * 3


def test_few_shot_rules_env():
    env = FewShotRulesEnv(seed=5, k=3, n_tasks=6)
    obs, info = env.reset()
    first = obs
    rewards, prev = [], None
    for t in range(6):
        task = env._tasks[t]
        assert obs.startswith("Examples:\n") and obs.endswith("\nOutput:")
        assert obs.count(" -> ") == 3 and info.get("answer") == prev  # only the last task's
        prev = task.answer
        action = task.answer if t % 2 == 0 else task.answer + "z"
        obs, r, term, trunc, info = env.step(action)
        assert info["answer"] == task.answer
        rewards.append(r)
        assert term == (t == 5) and not trunc
    assert rewards == [1.0, 0.0] * 3
    env2 = FewShotRulesEnv(seed=5, k=3, n_tasks=6)
    assert env2.reset()[0] == first
    assert FewShotRulesEnv(seed=6, k=3, n_tasks=6).reset()[0] != first


def test_register_and_make():
    register_envs()
    register_envs()  # harmless twice
    env = gym.make("sleepray/KnowledgeStream-v0", **SMALL)
    obs, info = env.reset()
    assert info["kind"] == "document" and isinstance(obs, str)
    obs, r, term, trunc, info = env.step("")
    assert r == 0.0
    env.close()
    env = gym.make("sleepray/KnowledgeStream-v0")
    assert env.reset()[1]["episode_id"] == "w0-e0"
    env = gym.make("sleepray/FewShotRules-v0", k=2, n_tasks=2)
    obs, _ = env.reset(seed=0)
    assert obs.count(" -> ") == 2
