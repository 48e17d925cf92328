"""One typed config for the whole system.

Loaded from YAML with dotted command-line overrides (``nrem.beta=0.3``) and
validated at load: an unknown key or a bad value raises ``ConfigError`` naming
the key. Every knob of the method (DESIGN.md section 1) is a field with a default.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class WorldConfig(_Section):
    """The built-in synthetic knowledge stream (bioS-style)."""
    seed: int = 0
    n_episodes: int = Field(5, ge=1)
    people_per_episode: int = Field(1, ge=0)
    orgs_per_episode: int = Field(0, ge=0)
    places_per_episode: int = Field(1, ge=0)
    phrasings_per_fact: int = Field(2, ge=1, description="distinct renderings of each fact in the documents")
    question_delay: int = Field(1, ge=0, description="episodes after which questions about an episode come back")
    source: Literal["builtin", "file"] = "builtin"
    data_path: Optional[str] = Field(None, description="JSONL or Parquet of user documents and QA pairs")
    qa_as_memory: bool = Field(False, description="world.source=file: {question, answer} records are evaluation "
                                                  "data and never reach a sleep; true (opt-in by name) also "
                                                  "puts each pair into its episode's memory as a document "
                                                  "'Q: ...\\nA: ...', so sleeps train on them; the evaluation "
                                                  "then refuses to run (it would grade what the sleep trained on)")


class ModelConfig(_Section):
    path: str = Field("seed:small", description="'seed:test', 'seed:small', a local HF folder or a hub id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU with bf16 support, else float32 (learner and engines alike)")
    trust_remote_code: bool = False
    device: str = "auto"
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto", description="render questions through the tokenizer's chat template (auto: when it has one); "
                            "the teacher's prompt carries the memory and is otherwise the same text")
    stop: Optional[list[str]] = Field(
        None, description="stop strings that end an answer, besides EOS and the template's end of turn "
                          "(None: a newline for plain Q:/A: prompts; the seed models' template ends a turn "
                          "with one)")
    cache_dir: Optional[str] = Field(None, description="where seed models are built; default ~/.cache/sleepray")


class SeedConfig(_Section):
    """Overrides for the seed-model build; the profile sets the defaults."""
    profile: Literal["test", "small"] = "small"
    steps: Optional[int] = Field(None, ge=1)
    seed: int = 0


GpuSwitch = Union[bool, Literal["auto"]]


def _gpu_switch(description: str):
    """A learner speed switch: off by default, "auto" on where the model is on a GPU
    (``sleepray.compiled_blocks.switched_on``); each has a test that it matches the plain path."""
    return Field(False, description=description)


class ExpertConfig(_Section):
    """L1 memory: low-rank experts on the MLP projections (PEFT LoRA)."""
    rank: int = Field(8, ge=1, description="rank r of each expert (paper default 64; smaller for tiny models)")
    lora_alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["auto"],
        description="module names the experts sit on; 'auto' = the MLP projection linears the model has "
                    "(gate_proj/up_proj/down_proj, Phi-3's gate_up_proj, fc1/fc2, ...)")
    max_slots: int = Field(8, ge=1, description="pre-allocated expert slots")
    adapter_dtype: Literal["model", "float32"] = Field(
        "model", description="the experts' LoRA weights in the model's dtype (bf16 on GPU: no casts in every "
                             "layer) or float32 (PEFT's default for half-precision models)")
    fused_lora: GpuSwitch = _gpu_switch(
        "each LoRA layer's adapters added inside the base layer's matrix product (cuBLAS addmm), "
        "forward and backward, in place of PEFT's three passes over the output "
        "(sleepray.fused_lora; PEFT's forward wherever it would differ); auto: inputs on a GPU")
    deep_sleep_every: int = Field(4, ge=1, description="K: merge L1 experts into L2 every K sleeps")


class _Anchored(_Section):
    """The KL anchor of a training phase (NREM, REM's dream SFT): KL(model before the sleep ||
    student) on unrelated text (drift control) and on older episodes' dreams (rehearsal)."""
    anchor_weight: float = Field(0.0, ge=0, description="drift control: weight of KL(frozen || student) "
                                                        "on anchor text unrelated to the episode (0 = off)")
    anchor_batch: int = Field(4, ge=1, description="anchor texts per step")
    anchor_replay: int = Field(4, ge=0, description="rehearsal: dreams about older episodes, from REM's replay "
                                                    "buffer, added to the anchor each step, so the student keeps "
                                                    "what the model before the sleep says about them (needs "
                                                    "rem.replay; 0 = off)")
    rehearsal_weight: Optional[float] = Field(None, ge=0, description="weight of the KL on those older dreams; "
                                                                      "None = anchor_weight")


class NREMConfig(_Anchored):
    """Knowledge Seeding: GKD + Learning to Imitate."""
    lam: float = Field(1.0, ge=0, le=1, description="lambda: fraction of student-sampled sequences")
    beta: float = Field(0.5, ge=0, le=1, description="generalized JSD beta (0 forward KL, 1 reverse KL)")
    alpha: float = Field(0.5, ge=0, le=1, description="objective (1-alpha) E[r] - alpha E[D]")
    gamma: float = Field(0.5, ge=0, le=1, description="reward mix gamma r_sem + (1-gamma) r_abs")
    z0: Optional[float] = Field(None, gt=0, description="Levenshtein gate; None = half the length")
    lr: float = Field(1e-3, gt=0, description="paper: 5e-6 for real models; tiny models need more")
    steps: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(24, ge=1)
    temperature: float = Field(1.0, gt=0)
    prompts_per_episode: int = Field(48, ge=1)
    judge: Literal["embedding", "model", "exact"] = "embedding"
    judge_threshold: float = Field(0.8, ge=-1, le=1)
    judge_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="the embedding judge's dtype (auto: bfloat16 on a GPU or a CPU with AMX/AVX512-BF16)")
    lti_group_size: int = Field(4, ge=1, description="completions per prefix (group baseline)")
    lti_clip: float = Field(0.2, gt=0, description="clip epsilon of the importance ratio")
    prefix_min_frac: float = Field(0.2, ge=0, lt=1)
    prefix_max_frac: float = Field(0.8, gt=0, le=1)
    use_lti: bool = True
    anchor_path: Optional[str] = Field(None, description="anchor text file, one paragraph per line "
                                                         "(default: held-out world + general text)")
    # how fast the learner runs it (each has a test that it matches the plain path)
    teacher_samples: int = Field(4, ge=0, description="teacher samples per prompt, drawn in one batched pass "
                                                      "before the first step and reused (the teacher is frozen "
                                                      "and its context fixed); 0 = sample the teacher every step")
    sample_ahead: int = Field(1, ge=1, description="optimizer steps whose sequences are drawn in one sampler call "
                                                   "(1: every step samples the student as it is; k: the student's "
                                                   "samples are up to k - 1 steps old, and LTI's importance ratio "
                                                   "uses the log-probs of the student that drew them)")
    fused_loss: bool = Field(True, description="losses from hidden states at the scored positions, the LM head "
                                               "and the loss fused a chunk at a time; false: full logits")
    decode: Literal["auto", "own", "graph", "fused"] = Field(
        "auto", description="the learner's own sampling loop: eager ('own'), each decode step replayed from a "
                            "CUDA graph over a static KV cache ('graph'), or Llama/Mistral/Qwen2/Qwen3 blocks run "
                            "with the experts merged and q|k|v and gate|up fused, one CUDA graph a step on a GPU "
                            "('fused', sleepray.fused_decode; eager on a CPU; merges the experts by itself, so "
                            "merged_sampling is not used; costs one copy of the blocks' weights); auto: on a GPU fused "
                            "for those families (no sliding window, no dynamic RoPE, plain LoRA), else graph; own "
                            "on a CPU")
    loss_chunk: int = Field(512, ge=1, description="positions per chunk of the fused losses (peak memory ~ 6 x chunk x vocabulary x 4 bytes)")
    reuse_context_kv: bool = Field(True, description="the teacher's episode context is run once per NREM and its "
                                                     "keys/values reused by every teacher forward")
    compile_blocks: GpuSwitch = _gpu_switch(
        "torch.compile every decoder block (all blocks share the graphs) for the passes without a "
        "KV cache: the student's and the anchor's; auto: on a GPU")
    teacher_graph: GpuSwitch = _gpu_switch(
        "the teacher's pass after its episode's cached context replayed from a CUDA graph over "
        "a static KV cache holding the context for every row (needs reuse_context_kv and "
        "fused_loss); auto: on a GPU")
    teacher_graph_tokens: int = Field(128, ge=1, description="the most own tokens a row of the graphed teacher pass "
                                                             "has: the graph is as long as the run's rows can be "
                                                             "(a prompt after its episode's shared context plus "
                                                             "max_new_tokens, rounded up to 16), up to this; longer "
                                                             "rows run eager")
    merged_sampling: GpuSwitch = _gpu_switch(
        "the learner samples with its active experts merged into a copy of the adapted weights "
        "and LoRA off (no skinny LoRA products in every decode step; costs one copy of those "
        "weights' memory); auto: on a GPU")
    fast_guards: GpuSwitch = _gpu_switch(
        "calls of compiled code that repeat the one before (decode steps after a sampling call's "
        "first, decoder blocks after the second) check only the guards that tell torch.compile's "
        "graphs apart (skip_guard_eval_unsafe); auto: on a GPU")
    attention: Literal["auto", "cudnn", "efficient", "flash", "math"] = Field(
        "auto", description="PyTorch's scaled-dot-product attention kernel for the learner's passes (student, anchor, "
                            "the teacher's context and eager pass; not sampling or the teacher's graph); auto: PyTorch's choice "
                            "(cuDNN on a Hopper GPU, whose backward costs ~1 ms of host time a block); 'math' inside "
                            "compiled blocks is fused by inductor. 'flash' cannot take the padding mask of "
                            "right-padded rows, 'efficient' not grouped-query attention")
    compile_loss: GpuSwitch = _gpu_switch(
        "the fused JSD's loss and gradient on each chunk of logits compiled with torch.compile "
        "(its softmaxes and elementwise passes fused into a few kernels); auto: on a GPU")
    compile_backend: str = Field("inductor", description="torch.compile backend of compile_blocks ('aot_eager': "
                                                         "traced, no generated kernels)")
    fused_optimizer: GpuSwitch = _gpu_switch(
        "the open expert's AdamW as PyTorch's fused kernel (torch.optim.AdamW(fused=True)); "
        "auto: on a GPU")
    block_graphs: GpuSwitch = _gpu_switch(
        "the compiled blocks' forward and backward replayed from CUDA graphs (torch.compile "
        "'reduce-overhead': one recorded graph per block, padded length and gradient mode), for "
        "passes whose time is the host launching kernels (the student's at batch 16); needs "
        "compile_blocks and the inductor backend; auto: on a GPU")
    async_rows: GpuSwitch = _gpu_switch(
        "the passes' token rows and indices reach the GPU by pinned, non-blocking copies, and the "
        "right-padded rows of a pass from position 0 go without a padding mask (causal attention "
        "alone hides the padding after a row; transformers reads a mask back to check it): no "
        "host-device sync inside the passes, so the host queues the next kernels while the GPU "
        "runs; auto: on a GPU")
    block_graph_pad: int = Field(16, ge=1, description="with block_graphs, the student's and the anchor's rows "
                                                       "right-padded to a multiple of this many tokens, or of a quarter "
                                                       "of their length's power of two where that is larger (one "
                                                       "graph per length: at most four lengths an octave, padding "
                                                       "under a quarter of the row; compiled_blocks.graph_length)")

    @property
    def lti_on(self) -> bool:
        """Whether Learning to Imitate's term is in the objective (``use_lti`` and alpha < 1)."""
        return self.use_lti and self.alpha < 1.0

    @model_validator(mode="after")
    def _prefix_range(self):
        if self.prefix_min_frac >= self.prefix_max_frac:
            raise ValueError("prefix_min_frac must be < prefix_max_frac")
        if self.block_graphs is True and (self.compile_blocks is False or self.compile_backend != "inductor"):
            raise ValueError("nrem.block_graphs needs nrem.compile_blocks and nrem.compile_backend=inductor")
        return self


class REMConfig(_Anchored):
    """Dreaming: SEAL-style self-written curriculum."""
    enabled: bool = True
    dreams_per_episode: int = Field(8, ge=1, description="m")
    formats: list[Literal["implications", "qa", "rewrite"]] = Field(
        default_factory=lambda: ["implications", "qa", "rewrite"])
    keep_top_k: int = Field(4, ge=0, description="k")
    keep_random: int = Field(1, ge=0, description="b")
    selection: Literal["grad_align", "grad_norm"] = "grad_align"
    random_expert: bool = True
    trial_steps: int = Field(5, ge=1)
    trial_lr: float = Field(1e-3, gt=0)
    restem: bool = True
    restem_lr: float = Field(5e-4, gt=0)
    restem_steps: int = Field(20, ge=0)
    replay: bool = True
    replay_fraction: float = Field(0.3, ge=0, le=1)
    buffer_size: int = Field(2000, ge=0)
    curriculum: Literal["easy_to_hard", "hard_to_easy", "random"] = "easy_to_hard"
    sft_steps: int = Field(50, ge=0)
    sft_lr: float = Field(1e-3, gt=0)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    random_expert_scale: float = Field(
        0.05, gt=0, description="size of the random unused expert's perturbation while dreaming")
    probes_per_episode: int = Field(8, ge=1, description="probe questions per episode for scoring and trials")
    probe_max_new_tokens: int = Field(12, ge=1, description="length of the teacher's greedy probe answers")
    trial_metric: Literal["loss", "accuracy"] = Field(
        "loss", description="probe score of a trial, vs the teacher's answers: NLL (lower is better) "
                            "or greedy exact match")
    batch_size: int = Field(8, ge=1, description="batch size of dream SFT and of the ReST-EM update")
    replay_probes: bool = Field(True, description="the probe questions with the teacher's answers (the model's own, "
                                                  "with the memory in context) join the rehearsal buffer as qa "
                                                  "dreams, so later sleeps rehearse every probed fact")
    revert_if_worse: bool = Field(True, description="after the dream SFT, put the expert back as NREM left it "
                                                    "when its closed-book loss on the probe targets rose or "
                                                    "fewer of the teacher's answers came out")
    retention_probes: int = Field(36, ge=0, description="older episodes' probe answers (from the buffer; those "
                                                        "the model gave closed-book after their own sleep, spread "
                                                        "evenly over the episodes) checked before and after the "
                                                        "dream SFT; with revert_if_worse, fewer right there also "
                                                        "reverts it (0 = no check)")
    retention_tolerance: float = Field(0.0, ge=0, le=1, description="accuracy on those that the dream SFT (or, "
                                                                    "with retention_scales, the sleep) may "
                                                                    "lose before it is reverted (scaled down)")
    retention_scales: list[float] = Field(default_factory=list,
                                          description="after REM, when any older episode's accuracy on its "
                                                      "retention probes is more than retention_tolerance below "
                                                      "the model's before this sleep, the new expert's weight "
                                                      "delta is scaled by each of these in turn (e.g. [0.75, "
                                                      "0.5, 0.25, 0.0]) until none is; empty = never scaled")
    repair_steps: int = Field(0, ge=0, description="after REM, when an older episode is more than "
                                                   "retention_tolerance below the model's before this sleep, "
                                                   "dream-SFT steps on the buffer's rows about it together with "
                                                   "this sleep's probe answers, per round, before any scaling "
                                                   "(0 = no repair)")
    repair_rounds: int = Field(3, ge=1, description="repair rounds at most, each followed by the retention check")
    writer_rank: Optional[int] = Field(None, ge=1, description="rank of the dream-writer adapter; "
                                                               "None = the experts' rank")

    @model_validator(mode="after")
    def _scales(self):
        bad = [x for x in self.retention_scales if not 0.0 <= x < 1.0]
        if bad:
            raise ValueError(f"retention_scales must each be in [0, 1) (1 is the unscaled expert): {bad}")
        return self


class CycleConfig(_Section):
    storage: str = Field("runs/default", description="local folder or pyarrow/fsspec URI")
    capacity_tokens: int = Field(2048, ge=1, description="short-term memory size that triggers sleep (chunk size)")
    schedule_seconds: Optional[float] = Field(None, gt=0)
    n_sleeps: int = Field(2, ge=1, description="sleeps the cycle job runs before it stops")
    poll_seconds: float = Field(2.0, gt=0, description="how often the Coordinator checks its sleep triggers")


class EngineConfig(_Section):
    kind: Literal["auto", "vllm", "transformers"] = "auto"
    kv_cache_gib: float = Field(1.0, gt=0)
    max_model_len: int = Field(1024, ge=16)
    enforce_eager: bool = True
    max_loras: int = Field(4, ge=1)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)


class RayConfig(_Section):
    address: Optional[str] = Field(None, description="None: RAY_ADDRESS or an embedded local cluster")
    namespace: str = Field("sleepray", description="Ray namespace of the named actors")
    num_cpus: Optional[int] = Field(None, ge=1, description="logical CPUs of an embedded local cluster")
    num_rollout_workers: int = Field(1, ge=1)
    num_learner_workers: int = Field(1, ge=1, description="Ray Train DDP workers")
    use_gpu: bool = False
    rollout_engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="engine of the RolloutWorkers (auto: vLLM where it imports)")
    sampling: Literal["auto", "rollouts", "learner"] = Field(
        "auto", description="where NREM's samples and REM's dreams come from on Ray: the RolloutWorkers (the "
                            "student as a draft adapter published every publish_every steps; the dream adapters "
                            "exported and published per episode) or the learner's own decode loop (no round "
                            "trip, no drafts); auto: rollouts with ray.use_gpu, else the learner (on CPU the "
                            "learner's loop is several times faster for a small model)")
    publish_every: int = Field(10, ge=1, description="NREM steps between adapter publishes to the rollouts")
    checkpoint_every: int = Field(10, ge=1, description="NREM steps between Ray Train checkpoints")
    max_failures: int = Field(2, ge=0, description="Ray Train FailureConfig.max_failures")
    train_poll_seconds: float = Field(0.1, gt=0, description="Ray Train's controller poll interval "
                                                              "(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): the learner "
                                                              "reports every NREM step and a report waits for "
                                                              "the next poll, so Ray's default 2 s holds every "
                                                              "step to 2 s")
    actor_max_restarts: int = Field(3, ge=0, description="restarts of a dead RolloutWorker")
    detached: bool = Field(False, description="keep the Coordinator alive after the driver exits")
    rollout_resources: dict[str, float] = Field(
        default_factory=dict, description="extra Ray resources per RolloutWorker, e.g. {rollout: 1} "
                                          "to place them on cluster.yaml's rollout_gpu nodes")
    learner_resources: dict[str, float] = Field(
        default_factory=dict, description="extra Ray resources per Ray Train worker, e.g. {learner: 1}; "
                                          "{CPU: n} gives it n CPUs (and n torch threads) instead of 1")
    release_between_sleeps: bool = Field(
        False, description="stop the RolloutWorkers after each sleep (autoscaling clusters give the nodes back)")

    @property
    def samples_on_rollouts(self) -> bool:
        """Whether NREM's samples and REM's dreams come from the RolloutWorkers (``sampling``)."""
        return self.sampling == "rollouts" or (self.sampling == "auto" and self.use_gpu)


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key: Optional[str] = Field(None, description="one key for one user: the tenant 'default' (storage "
                                                      "cycle.storage), admin too; with tenants_file, more")
    tenants_file: Optional[str] = Field(None, description="YAML of tenants and their hashed API keys "
                                                          "(sleepray keys add; sleepray/tenants.py)")
    allow_open: bool = Field(False, description="serve a non-loopback host without any API key (refused "
                                                "otherwise: every user would share one memory)")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="request bodies above this get 413, unread")
    max_prompt_chars: int = Field(32_000, ge=1, description="a prompt (or a chat's messages together) above "
                                                            "this gets 422, before tokenizing")
    max_memory_chars: int = Field(200_000, ge=1, description="a memory's documents together above this get 422")
    rate_limit_rps: float = Field(20.0, ge=0, description="per tenant and replica, requests a second "
                                                          "(token bucket; 0 = no limit); 429 above it")
    rate_limit_burst: int = Field(40, ge=1, description="the bucket's size: requests a tenant may send at once")
    record_answers: bool = Field(False, description="also record the model's answers with what the user sent, "
                                                    "marked as model output (never trained as ground truth); "
                                                    "a request can ask with record_answers")
    memory: Literal["on", "off"] = "on"
    context_policy: Literal["all", "recent", "relevant"] = Field(
        "recent", description="short-term memory put into the context when not all of it fits: "
                              "the newest (all, recent) or the most relevant to the prompt")
    max_tokens_limit: int = Field(256, ge=1)
    poll_seconds: float = Field(1.0, gt=0, description="how often replicas look for a new adapter version")
    model_name: str = Field("sleepray", min_length=1, description="the model id of /v1/models")
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0, description="logical CPUs of each replica")
    max_ongoing_requests: int = Field(32, ge=1, description="per replica, before Serve queues requests")
    max_batch_size: int = Field(16, ge=1, description="generation requests batched into one engine call")
    auto_sleep: bool = Field(True, description="when no Coordinator runs, the endpoint's sleeper also falls "
                                               "asleep by itself on memory pressure (cycle.capacity_tokens) "
                                               "and on schedule (cycle.schedule_seconds), checked every "
                                               "cycle.poll_seconds")
    chat_stop: list[str] = Field(default_factory=lambda: ["\n"],
                                 description="stop strings added to every chat completion (the seed "
                                             "model answers in one line; [] for multi-line models)")


class EvalConfig(_Section):
    """The continual-learning benchmark (``sleepray eval``; see sleepray/eval_run.py)."""
    profile: Literal["quick", "standard"] = "quick"
    seeds: int = Field(3, ge=1)
    methods: list[str] = Field(default_factory=lambda: ["no_sleep", "in_context", "sleep"])
    first_seed: int = Field(0, ge=0, description="seeds are first_seed .. first_seed + seeds - 1 "
                                                 "(each sets seed.seed: training randomness; the world stays)")
    baseline_steps: Optional[int] = Field(None, ge=1, description="training steps of sft and seal per sleep; "
                                                                  "None = nrem.steps")
    baseline_lr: Optional[float] = Field(None, gt=0, description="learning rate of sft and seal; None = nrem.lr")
    full_model_lr: float = Field(1e-4, gt=0, description="learning rate of the whole-model methods "
                                                         "(distill_no_expansion, no_expansion)")
    seal_formats: Optional[list[Literal["implications", "qa", "rewrite"]]] = Field(
        None, description="self-edit formats of seal; None = rem.formats")
    seal_dreams_per_episode: Optional[int] = Field(None, ge=1, description="None = rem.dreams_per_episode")
    in_context: bool = Field(True, description="also measure every model with each episode in its context")
    answer_max_new_tokens: int = Field(12, ge=1)
    drift_texts: int = Field(32, ge=1, description="paragraphs of held-out general text for perplexity drift")
    drift_world_episodes: int = Field(4, ge=1, description="held-out world episodes for perplexity drift")
    keep_runs: bool = Field(False, description="keep each run's storage (memory, adapters) under OUT/runs")
    num_threads: Optional[int] = Field(None, ge=1, description="torch CPU threads while evaluating; None = torch's "
                                                               "default (1 is steadier on a shared machine)")


class Config(_Section):
    world: WorldConfig = Field(default_factory=WorldConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    seed: SeedConfig = Field(default_factory=SeedConfig)
    experts: ExpertConfig = Field(default_factory=ExpertConfig)
    nrem: NREMConfig = Field(default_factory=NREMConfig)
    rem: REMConfig = Field(default_factory=REMConfig)
    cycle: CycleConfig = Field(default_factory=CycleConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{k}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["nrem.beta=0.3", "world.n_episodes=2"]`` into a nested dict (YAML-typed values)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"override '{item}' has no key")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{key}: {msg}")
    return "invalid config: " + "; ".join(lines)


def from_dict(data: dict) -> Config:
    try:
        return Config.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (optional), apply dotted overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
    data = _merge(data, parse_overrides(overrides or []))
    return from_dict(data)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
