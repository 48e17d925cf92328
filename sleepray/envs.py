"""Gymnasium environments over the knowledge stream and the few-shot rules world.

``KnowledgeStreamEnv``: documents of episode i (one per step, action ignored), then
questions about episode i and about episode i - question_delay; a question's action is
the text answer, rewarded by exact match. ``FewShotRulesEnv``: rendered few-shot
prompts, answered by text. Ground truth is never shown before the answer is given: the
``info`` returned by a step may carry ``answer`` (and ``f1``) of the item just answered,
while ``kind``/``episode``/``entity``/... describe the new observation.

Both pass ``gymnasium.utils.env_checker.check_env`` with their ``Text`` spaces.
Actions are read leniently: any ``str`` is accepted, even with characters outside the
action charset, since a model may write them.
"""
from __future__ import annotations

import random
import string
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from sleepray.qa import exact_match, token_f1
from sleepray.rules import make_task, render_prompt
from sleepray.world import Probe, World

CHARSET = frozenset(string.printable)  # letters, digits, punctuation, space, \t \n \r ...
OBS_MAX_LEN = 8192
ACT_MAX_LEN = 256

KNOWLEDGE_STREAM_ID = "sleepray/KnowledgeStream-v0"
FEW_SHOT_RULES_ID = "sleepray/FewShotRules-v0"


def _text_spaces() -> tuple[spaces.Text, spaces.Text]:
    # min_length=0: the observation after the last item is the empty string
    return (spaces.Text(max_length=OBS_MAX_LEN, min_length=0, charset=CHARSET),
            spaces.Text(max_length=ACT_MAX_LEN, min_length=0, charset=CHARSET))


def _check_action(action: Any) -> str:
    if not isinstance(action, str):
        raise TypeError(f"action must be a str, got {type(action).__name__}")
    return action


class KnowledgeStreamEnv(gym.Env):
    metadata = {"render_modes": ["ansi"]}

    def __init__(self, world_seed: int = 0, n_episodes: int = 3, people_per_episode: int = 4,
                 orgs_per_episode: int = 1, places_per_episode: int = 1,
                 phrasings_per_fact: int = 2, questions_per_episode: int = 6,
                 question_delay: int = 1, render_mode: str | None = None):
        if n_episodes < 1 or questions_per_episode < 0 or question_delay < 0:
            raise ValueError("need n_episodes >= 1, questions_per_episode >= 0, question_delay >= 0")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}")
        self.render_mode = render_mode
        self.world_seed = world_seed
        self.n_episodes = n_episodes
        self.questions_per_episode = questions_per_episode
        self.question_delay = question_delay
        self.world = World(world_seed, people_per_episode, orgs_per_episode,
                           places_per_episode, phrasings_per_fact)
        self.episodes = self.world.episodes(n_episodes)
        self.observation_space, self.action_space = _text_spaces()
        self._items: list[dict] = []
        self._pos = 0

    # -- item plan -------------------------------------------------------------------
    def _sample_questions(self, ep_idx: int) -> list[dict]:
        """``questions_per_episode`` probes about distinct facts of one episode."""
        by_fact: dict[tuple[str, str], list[Probe]] = {}
        for p in self.episodes[ep_idx].probes:
            by_fact.setdefault((p.entity, p.attribute), []).append(p)
        facts = list(by_fact.values())
        n = min(self.questions_per_episode, len(facts))
        chosen = self.np_random.choice(len(facts), size=n, replace=False) if n else []
        out = []
        for j in chosen:
            templates = facts[int(j)]
            probe = templates[int(self.np_random.integers(len(templates)))]
            out.append({"kind": "question", "episode": ep_idx, "text": probe.question,
                        "probe": probe})
        return out

    def _plan(self) -> list[dict]:
        items: list[dict] = []
        for i, ep in enumerate(self.episodes):
            items += [{"kind": "document", "episode": i, "text": d} for d in ep.documents]
            items += self._sample_questions(i)
            if self.question_delay > 0 and i - self.question_delay >= 0:
                items += self._sample_questions(i - self.question_delay)
        return items

    def _obs_info(self) -> tuple[str, dict]:
        if self._pos >= len(self._items):
            return "", {"kind": "end"}
        item = self._items[self._pos]
        ep = self.episodes[item["episode"]]
        info = {"kind": item["kind"], "episode": item["episode"], "episode_id": ep.episode_id,
                "step": self._pos}
        if item["kind"] == "question":
            info["entity"] = item["probe"].entity
            info["attribute"] = item["probe"].attribute
        return item["text"], info

    # -- gymnasium API ---------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is None and self._np_random is None:
            seed = self.world_seed  # deterministic by default; reset(seed=...) reseeds questions
        super().reset(seed=seed)
        self._items = self._plan()
        self._pos = 0
        return self._obs_info()

    def step(self, action):
        if not self._items or self._pos >= len(self._items):
            raise RuntimeError("step() after the stream ended (or before reset()): call reset()")
        item = self._items[self._pos]
        reward, extra = 0.0, {}
        if item["kind"] == "question":
            answer = _check_action(action)
            gold = item["probe"].answer
            reward = exact_match(answer, gold)
            extra = {"answer": gold, "f1": token_f1(answer, gold), "exact_match": reward}
        self._pos += 1
        obs, info = self._obs_info()
        info.update(extra)
        terminated = self._pos >= len(self._items)
        return obs, float(reward), terminated, False, info

    def render(self):
        if self.render_mode == "ansi":
            return self._obs_info()[0]
        return None

    @property
    def n_steps(self) -> int:
        """Number of steps in one pass (after reset)."""
        return len(self._items)


class FewShotRulesEnv(gym.Env):
    metadata = {"render_modes": ["ansi"]}

    def __init__(self, seed: int = 0, k: int = 3, n_tasks: int = 10,
                 render_mode: str | None = None):
        if n_tasks < 1 or k < 0:
            raise ValueError("need n_tasks >= 1 and k >= 0")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}")
        self.render_mode = render_mode
        self.seed_ = seed
        self.k = k
        self.n_tasks = n_tasks
        self.observation_space, self.action_space = _text_spaces()
        self._tasks: list = []
        self._pos = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is None and self._np_random is None:
            seed = self.seed_
        super().reset(seed=seed)
        rng = random.Random(int(self.np_random.integers(2**63)))
        self._tasks = [make_task(rng, self.k) for _ in range(self.n_tasks)]
        self._pos = 0
        return self._obs_info()

    def _obs_info(self) -> tuple[str, dict]:
        if self._pos >= len(self._tasks):
            return "", {"kind": "end"}
        return render_prompt(self._tasks[self._pos]), {"kind": "rule_task", "task": self._pos}

    def step(self, action):
        if not self._tasks or self._pos >= len(self._tasks):
            raise RuntimeError("step() after the last task (or before reset()): call reset()")
        task = self._tasks[self._pos]
        # strict (case-sensitive) match: qa.exact_match lowercases, which would void "uppercase"
        reward = float(_check_action(action).strip() == task.answer)
        self._pos += 1
        obs, info = self._obs_info()
        info.update({"answer": task.answer, "rule": task.rule, "exact_match": reward})
        return obs, reward, self._pos >= len(self._tasks), False, info

    def render(self):
        if self.render_mode == "ansi":
            return self._obs_info()[0]
        return None


def register_envs() -> None:
    """Register both environments with gymnasium; calling it again is harmless."""
    for env_id, entry in ((KNOWLEDGE_STREAM_ID, "sleepray.envs:KnowledgeStreamEnv"),
                          (FEW_SHOT_RULES_ID, "sleepray.envs:FewShotRulesEnv")):
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry)
