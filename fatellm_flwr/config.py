"""One typed, validated configuration built from Flower's ``context.run_config``.

Every run-config key (kebab-case, as in ``pyproject.toml`` and ``--run-config``) maps to a
field of :class:`Config`. Unknown keys and bad values raise :class:`ConfigError` naming
the key, the value and what is allowed, before any model is loaded or trained.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A run-config key or value that is not allowed."""


def _opt(default: Any, help: str, choices: tuple | None = None, low: float | None = None,
         high: float | None = None, low_open: bool = False, high_open: bool = False):
    """A config field with its documentation and validation bounds."""
    return field(default=default, metadata=dict(help=help, choices=choices, low=low, high=high,
                                                low_open=low_open, high_open=high_open))


ALGORITHMS = ("homo", "fedkseed", "offsite", "fedmkt", "inferdpt")
PEFT_METHODS = ("lora", "ia3", "prompt-tuning", "prefix-tuning")
QUANTIZATIONS = ("none", "8bit", "4bit")
TASKS = ("auto", "classification", "instruction", "lm")
PARTITIONERS = ("iid", "dirichlet", "pathological", "natural")
AGGREGATORS = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm")
SCHEDULERS = ("constant", "linear", "cosine")
EVAL_METRICS = ("auto", "accuracy", "rouge-l", "perplexity")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Config:
    """All run-config keys. Field names are the keys with ``-`` replaced by ``_``."""

    # --- what to run
    algorithm: str = _opt("homo", "Federated algorithm.", ALGORITHMS)
    num_server_rounds: int = _opt(3, "Federated rounds.", low=1)
    seed: int = _opt(42, "Seed for data splits, sampling and initialisation.", low=0)
    # --- model
    model: str = _opt("builtin:smollm2-135m-instruct",
                      "Causal LM: `builtin:<name>`, a Hugging Face hub id, or a local folder.")
    gguf_file: str = _opt("", "GGUF file inside `model` to load with transformers (optional).")
    quantization: str = _opt("none", "Base-model quantization with bitsandbytes (QLoRA).",
                             QUANTIZATIONS)
    dtype: str = _opt("float32", "Compute dtype of the (non-quantized) base model.", DTYPES)
    device: str = _opt("auto", "Where models and batches live: auto (CUDA when present, "
                       "then MPS, else CPU), cpu, cuda, cuda:N or mps; a SuperNode's node config "
                       "`device=...` overrides it. A GPU this machine lacks is an error.")
    num_threads: int = _opt(1, "CPU threads torch uses on each client (0 = torch's default: "
                            "all cores, or OMP_NUM_THREADS); a SuperNode's node config "
                            "`num-threads=...` overrides it. In simulation set it to "
                            "`client-resources-num-cpus` so clients do not oversubscribe the "
                            "cores.", low=0)
    gradient_checkpointing: bool = _opt(False, "Recompute activations in the backward pass "
                                        "(transformers' gradient checkpointing): less "
                                        "training memory, more compute.")
    wire_dtype: str = _opt("float32", "dtype of the float arrays that travel (both "
                           "directions); the server aggregates in float32 and keeps the "
                           "global state in the model's dtype.", ("float32", "float16"))
    # --- PEFT
    peft_method: str = _opt("lora", "Parameter-efficient method (homo).", PEFT_METHODS)
    lora_r: int = _opt(8, "LoRA rank.", low=1)
    lora_alpha: float = _opt(16.0, "LoRA alpha (scale = alpha / r).", low=0, low_open=True)
    lora_dropout: float = _opt(0.05, "LoRA dropout.", low=0, high=1, high_open=True)
    target_modules: str = _opt("", "Comma-separated module names to adapt; empty = all linear "
                               "layers of the transformer blocks, found from the model.")
    num_virtual_tokens: int = _opt(8, "Virtual tokens for prompt/prefix tuning.", low=1)
    peft_last_layers: int = _opt(0, "LoRA: adapt only the last N decoder blocks (0 = "
                                 "all). Fewer parameters travel and get DP noise, and the "
                                 "backward pass stops at the first adapted block.", low=0)
    # --- data
    dataset: str = _opt("builtin:bbc-news", "`builtin:<name>`, a local json/jsonl/csv/parquet "
                        "file, or a `datasets` hub name.")
    dataset_split: str = _opt("train", "Split to read from a hub dataset.")
    task: str = _opt("auto", "classification (text -> label word), instruction "
                     "(instruction/input -> output; loss on the response only) or lm (plain "
                     "text); auto picks from the columns.", TASKS)
    text_column: str = _opt("text", "Text column (classification / lm).")
    label_column: str = _opt("label", "Label column (classification).")
    instruction_column: str = _opt("instruction", "Instruction column (instruction task).")
    input_column: str = _opt("input", "Optional input/context column (instruction task).")
    output_column: str = _opt("output", "Response column (instruction task).")
    prompt_template: str = _opt("", "Python format string with {text}/{instruction}/{input} "
                                "fields; empty = the task's default template.")
    use_chat_template: bool = _opt(True, "Wrap prompts in the tokenizer's chat template when "
                                   "it has one.")
    max_length: int = _opt(256, "Max tokens per example (prompts are truncated from the "
                           "right, the response is kept).", low=8)
    max_examples: int = _opt(0, "Use at most this many examples in total (0 = all); a "
                             "stratified random subset.", low=0)
    test_size: int = _opt(100, "Examples held out for server-side evaluation.", low=0)
    server_eval_dataset: str = _opt("", "The server's own evaluation set (`builtin:<name>`, "
                                    "a local file or a hub name, same columns as the clients' "
                                    "data); empty = hold out test-size examples of `dataset` "
                                    "(simulation); `none` = the server holds no data and relies "
                                    "on the clients' aggregated evaluation (fraction-evaluate).")
    server_val_size: int = _opt(0, "Examples held out for the server's validation, disjoint "
                                "from the test set and from every client's data (out of "
                                "`dataset`'s training pool, or out of server-eval-dataset when "
                                "set); the global state is evaluated on them every round "
                                "(`server_val_*`), e.g. to keep the best round (best-metric). "
                                "0 = none.", low=0)
    node_data_path: str = _opt("", "Simulated organisations' own files: a path containing "
                               "`{partition-id}` (e.g. `data/org-{partition-id}.jsonl`); each "
                               "node reads only its file, nothing is partitioned. A SuperNode's "
                               "node config `data-path` takes precedence.")
    labels: str = _opt("", "Classification label set every party agrees on, comma-separated "
                       "in a stable order; empty = the sorted labels of the server's data. "
                       "Needed when SuperNodes read their own data (node config data-path) "
                       "and the server has no evaluation set.")
    partitioner: str = _opt("dirichlet", "How client partitions are drawn (flwr-datasets).",
                            PARTITIONERS)
    dirichlet_alpha: float = _opt(0.5, "Dirichlet concentration (smaller = more skew).",
                                  low=0, low_open=True)
    classes_per_client: int = _opt(2, "Classes per client for the pathological partitioner.",
                                   low=1)
    partition_column: str = _opt("", "Column for dirichlet/pathological/natural partitioning; "
                                 "empty = label column (classification) or `category`.")
    val_fraction: float = _opt(0.1, "Per-client validation fraction.", low=0, high=1,
                               high_open=True)
    # --- local training
    local_steps: int = _opt(10, "Optimizer steps per round (0 = use local-epochs).", low=0)
    local_epochs: float = _opt(0.0, "Epochs per round when local-steps is 0.", low=0)
    batch_size: int = _opt(4, "Per-step micro-batch size.", low=1)
    grad_accum: int = _opt(1, "Gradient accumulation micro-batches per step.", low=1)
    lr: float = _opt(3e-4, "Client learning rate (AdamW).", low=0, low_open=True)
    weight_decay: float = _opt(0.0, "AdamW weight decay.", low=0)
    lr_scheduler: str = _opt("constant", "Per-round LR schedule.", SCHEDULERS)
    warmup_steps: int = _opt(0, "Linear warm-up steps within a round.", low=0)
    max_grad_norm: float = _opt(1.0, "Gradient clipping (0 = off).", low=0)
    proximal_mu: float = _opt(0.0, "FedProx proximal term mu (0 = off).", low=0)
    # --- server
    aggregator: str = _opt("fedavg", "Server aggregation.", AGGREGATORS)
    server_lr: float = _opt(0.0, "Server learning rate (fedadam/fedyogi/fedavgm); 0 = the "
                            "aggregator's default: 0.01 for fedadam/fedyogi, 1.0 for fedavgm.",
                            low=0)
    server_momentum: float = _opt(0.9, "Server momentum (fedavgm).", low=0, high=1,
                                  high_open=True)
    beta1: float = _opt(0.9, "First moment decay (fedadam/fedyogi).", low=0, high=1,
                        high_open=True)
    beta2: float = _opt(0.99, "Second moment decay (fedadam/fedyogi).", low=0, high=1,
                        high_open=True)
    tau: float = _opt(1e-3, "Adaptivity (fedadam/fedyogi).", low=0, low_open=True)
    fraction_fit: float = _opt(1.0, "Fraction of clients sampled to train each round.", low=0,
                               high=1, low_open=True)
    min_fit_clients: int = _opt(2, "Minimum clients to train each round.", low=1)
    fraction_evaluate: float = _opt(0.0, "Fraction of clients that evaluate on their "
                                    "validation split each round (0 = off).", low=0, high=1)
    min_available_clients: int = _opt(2, "Clients to wait for before a round starts.", low=1)
    # --- fedkseed (zeroth-order full-parameter tuning, algorithm="fedkseed"; see
    # strategies/fedkseed.py)
    zo_num_seeds: int = _opt(4096, "FedKSeed: candidate seeds K drawn from `seed` (every local "
                             "step perturbs all tuned weights along one of them).", low=1,
                             high=2**31 - 1)
    zo_eps: float = _opt(5e-4, "FedKSeed: perturbation scale of the two-point zeroth-order "
                         "estimate.", low=0, low_open=True)
    zo_lr: float = _opt(1e-5, "FedKSeed: learning rate of the zeroth-order steps (separate from "
                        "the AdamW `lr`).", low=0, low_open=True)
    zo_weight_decay: float = _opt(0.0, "FedKSeed: weight decay of the local ZO steps (2-D+ "
                                  "tensors; not aggregated by the server, see "
                                  "strategies/fedkseed.py).", low=0)
    zo_grad_clip: float = _opt(0.0, "FedKSeed: skip a local step whose |scalar gradient| "
                               "exceeds this (0 = off).", low=0)
    zo_bias_loss_clip: float = _opt(1000.0, "FedKSeed: |g| clip used when scoring seeds for "
                                    "probability-differentiated sampling.", low=0,
                                    low_open=True)
    zo_exclude_embeddings: bool = _opt(True, "FedKSeed: leave the input token embedding (and a "
                                       "head tied to it: 21% of SmolLM2-135M's weights) out "
                                       "of the tuned weights; false tunes every weight.")
    zo_cache_z: bool = _opt(False, "FedKSeed: generate each local step's perturbation once and "
                            "hold it for the step (one z generation per step instead of three; "
                            "costs one extra copy of the tuned weights in device memory, which "
                            "the default MeZO-style regeneration avoids). Same results.")
    # --- offsite (offsite-tuning, algorithm="offsite"; see strategies/offsite.py)
    offsite_bottom: int = _opt(2, "Offsite: bottom decoder blocks that are trainable adapters "
                               "(a).", low=0)
    offsite_top: int = _opt(2, "Offsite: top decoder blocks that are trainable adapters (b).",
                            low=0)
    offsite_emulator_layers: int = _opt(6, "Offsite: middle blocks kept (uniform layer drop) in "
                                        "the frozen emulator sent to clients (n <= layers - a - "
                                        "b; checked against the model at server start-up).",
                                        low=0)
    offsite_distill: bool = _opt(False, "Offsite: distil the emulator's middle blocks on public "
                                 "text (offsite-distill-dataset) before federation.")
    offsite_distill_dataset: str = _opt("builtin:chatterbot", "Offsite: public text for "
                                        "distillation (`builtin:<name>`, a local file or a hub "
                                        "name; never the clients' data).")
    offsite_distill_steps: int = _opt(100, "Offsite: distillation optimizer steps.", low=1)
    offsite_distill_lr: float = _opt(1e-3, "Offsite: distillation learning rate (AdamW); "
                                     "with 100 steps it brings SmolLM2's emulator much closer "
                                     "to the full model than 1e-4 x 50 (measured in "
                                     "benchmarks/results/offsite_split.md).",
                                     low=0, low_open=True)
    offsite_lora: bool = _opt(False, "Offsite: clients train LoRA (lora-r/alpha/dropout, "
                              "target-modules) on the adapter blocks and send them merged, "
                              "instead of fully fine-tuning the adapter blocks.")
    # --- heterogeneous LoRA ranks (FlexLoRA, algorithm="homo"; see flexlora.py)
    lora_ranks: str = _opt("", "Clients' own LoRA ranks, comma-separated by partition id "
                           "(simulation), e.g. `4,8,16`; empty = every client uses lora-r "
                           "unless its SuperNode's node config sets `lora-r`.")
    lora_aggregation: str = _opt("auto", "How LoRA adapters are aggregated: `fedavg` averages "
                                 "A and B; `flexlora` (Bai et al. 2024) averages the products "
                                 "B·A and gives each client a truncated SVD at its own rank; "
                                 "`auto` = flexlora when lora-ranks differ, else fedavg.",
                                 ("auto", "fedavg", "flexlora"))
    # --- fedmkt (algorithm="fedmkt": server LLM `model` <-> clients' SLMs; see fedmkt.py)
    slm_models: str = _opt("builtin:smollm2-135m-instruct", "FedMKT: clients' small LMs, "
                           "comma-separated by partition id (one entry = every client); a "
                           "SuperNode's node config `slm-model` overrides.")
    public_dataset: str = _opt("", "FedMKT: public data on which knowledge is exchanged "
                               "(`builtin:<name>`, a file or a hub name; never a client's "
                               "data); empty = the first fedmkt-public-size examples of the "
                               "server's held-out test split (the server evaluates on the "
                               "rest).")
    fedmkt_public_size: int = _opt(32, "FedMKT: public examples used each round.", low=1)
    fedmkt_top_k: int = _opt(16, "FedMKT: logits sent per token (values + token indices; "
                             "FATE-LLM uses 128).", low=1)
    fedmkt_lambda: float = _opt(0.1, "FedMKT: distillation weight, loss = (1 - lambda) LM + "
                                "lambda KD (FATE-LLM: 0.1).", low=0, high=1)
    fedmkt_selection: str = _opt("greater", "FedMKT: which SLMs teach the LLM on each public "
                                 "example: `greater` = the one with the lowest cross-entropy, "
                                 "`weighted-mean` = all, weighted by exp(-CE).",
                                 ("greater", "weighted-mean"))
    fedmkt_distill_epochs: int = _opt(1, "FedMKT: epochs over the public set of each "
                                      "distillation (LLM on the server, SLMs on the clients).",
                                      low=1)
    # --- privacy
    dp_sgd: bool = _opt(False, "Sample-level DP-SGD (Opacus) on the clients' trainable "
                        "parameters.")
    dp_noise_multiplier: float = _opt(0.0, "DP-SGD noise multiplier (0 = derive it from "
                                      "dp-target-epsilon).", low=0)
    dp_target_epsilon: float = _opt(0.0, "DP-SGD target epsilon for the whole run (0 = use "
                                    "dp-noise-multiplier).", low=0)
    dp_delta: float = _opt(1e-5, "DP delta (sample-level and client-level).", low=0, high=1,
                           low_open=True, high_open=True)
    dp_max_grad_norm: float = _opt(0.1, "DP-SGD per-sample gradient clipping bound; keep it "
                                   "below the records' gradient norms (benchmarks/dp_grad_norms.py "
                                   "measures them): a bound above them clips nothing and "
                                   "only adds noise.", low=0, low_open=True)
    dp_max_epsilon: float = _opt(0.0, "Stop a client's training once its epsilon would exceed "
                                 "this budget (0 = no budget).", low=0)
    dp_physical_batch_size: int = _opt(0, "DP-SGD: most records per forward/backward pass "
                                       "(virtual batching, like Opacus' BatchMemoryManager): "
                                       "batch-size is then the expected logical (Poisson) "
                                       "batch, noised and accounted once, while memory is "
                                       "bounded by this; 0 = the whole batch at once.", low=0)
    dp_accountant: str = _opt("rdp", "Privacy accountant.", ("rdp", "prv"))
    dp_reproducible_noise: bool = _opt(False, "DP-SGD: seed the noise and the Poisson "
                                       "sampler from `seed` (shared by all parties) instead "
                                       "of OS randomness. VOIDS THE DP GUARANTEE: whoever "
                                       "knows the run config can regenerate and subtract the "
                                       "noise. For debugging and tests only.")
    client_dp: str = _opt("none", "Client-level DP on each client's update (DP-FedAvg): "
                          "server-side or client-side fixed clipping, or adaptive clipping "
                          "(server- or client-side).",
                          ("none", "server-fixed", "client-fixed", "server-adaptive",
                           "client-adaptive"))
    client_dp_noise_multiplier: float = _opt(1.0, "Client-level DP noise multiplier.", low=0)
    client_dp_clip_norm: float = _opt(1.0, "Client-level clipping norm (initial norm when "
                                      "adaptive).", low=0, low_open=True)
    client_dp_target_quantile: float = _opt(0.5, "Adaptive clipping: target quantile of "
                                            "unclipped updates.", low=0, high=1)
    client_dp_clip_lr: float = _opt(0.2, "Adaptive clipping: clip-norm learning rate.", low=0,
                                    low_open=True)
    client_dp_clipped_count_stddev: float = _opt(
        0.0, "Adaptive clipping: std of the noise on the count of unclipped updates (sigma_b, "
        "Andrew et al. 2021); the update's noise is raised so the round's total stays "
        "client-dp-noise-multiplier. 0 = max(sampled clients / 20, "
        "client-dp-noise-multiplier), which works for any number of clients; an explicit "
        "value must exceed client-dp-noise-multiplier / 2.", low=0)
    secure_aggregation: bool = _opt(False, "Flower's SecAgg+ (the server only sees the sum of "
                                    "the clients' updates).")
    secagg_num_shares: float = _opt(3.0, "SecAgg+ shares per secret (> 1: a count; <= 1: a "
                                    "fraction of the sampled clients).", low=0, low_open=True)
    secagg_reconstruction_threshold: float = _opt(2.0, "SecAgg+ shares needed to reconstruct "
                                                  "(count, or fraction when <= 1).", low=0,
                                                  low_open=True)
    secagg_clipping_range: float = _opt(8.0, "SecAgg+ clips each sent value to +-this before "
                                        "quantizing (updates are sent as deltas).", low=0,
                                        low_open=True)
    secagg_quantization_range: int = _opt(16777216, "SecAgg+ quantization levels (2^24: "
                                          "sums of up to 255 clients fit its 2^32 modulus).",
                                          low=2)
    secagg_max_weight: float = _opt(1000.0, "SecAgg+ largest client weight (number of "
                                    "examples); the quantization step of an update is about "
                                    "2 * clipping-range * max-weight / (levels * weight), so "
                                    "set it close to the largest client's example count. A "
                                    "client with more examples fails with an error naming this "
                                    "key (Flower itself only warns, then clips or overflows its "
                                    "update).",
                                    low=0, low_open=True)
    # --- FedIPR ownership watermarks (algorithm="homo"; see privacy/fedipr.py)
    fedipr: bool = _opt(False, "FedIPR (Li et al. 2021): every client embeds its own secret "
                        "signature (OS-random, kept in its node state) in the norm scales of "
                        "the last fedipr-blocks blocks (trained and aggregated with the "
                        "adapter), or their LoRA products (fedipr-carriers), and reports its "
                        "detection rate each round.")
    fedipr_carriers: str = _opt("norm", "FedIPR: the weights that carry the signatures: norm "
                                "(the norm scales of the last fedipr-blocks blocks, sent as "
                                "extra trainable tensors) or lora (the LoRA products B*A of "
                                "those blocks; nothing extra travels; needs peft-method=lora; "
                                "for models without trainable norm scales, e.g. OLMo).",
                                ("norm", "lora"))
    fedipr_bits: int = _opt(64, "FedIPR: signature bits per client.", low=1)
    fedipr_blocks: int = _opt(2, "FedIPR: last transformer blocks whose normalization scales "
                              "(or LoRA products) carry the signatures (FATE-LLM: 2).", low=1)
    fedipr_lr: float = _opt(0.0, "FedIPR: learning rate of the AdamW step that minimises the "
                            "hinge regulariser sum relu(margin - b * (E gamma)) on the carriers "
                            "after every training step; 0 = lr. (Added to the training loss "
                            "instead, as FATE-LLM does with weight 0.01, Adam's per-coordinate "
                            "scaling lets the LM gradient drown it: detection stayed at chance "
                            "on SmolLM2.)", low=0)
    fedipr_margin: float = _opt(0.05, "FedIPR: hinge margin on the projected carriers (unit-norm "
                                "projection rows, so in weight units); > 0 keeps the bits "
                                "stable under aggregation and later fine-tuning.", low=0)
    fedipr_secret_dir: str = _opt("", "FedIPR: folder on each node where it keeps its secret "
                                  "(fedipr-secret-<partition-id>.json, reused by later runs) so "
                                  "its owner can verify a leaked model; empty = only the node's "
                                  "context.state. The server never reads it.")
    # --- InferDPT private inference (algorithm="inferdpt"; see privacy/inferdpt.py)
    inferdpt_remote_model: str = _opt("builtin:smollm2-135m-instruct", "InferDPT: the server's "
                                      "(remote) LLM that answers the perturbed prompts; the "
                                      "clients' local model, which perturbs and extracts, is "
                                      "`model`.")
    inferdpt_epsilon: float = _opt(3.0, "InferDPT: privacy budget per prompt token of the "
                                   "RANTEXT exponential mechanism (0 = no perturbation, "
                                   "not private).", low=0)
    inferdpt_top_k: int = _opt(64, "InferDPT: size of each token's embedding-distance "
                               "neighbourhood the replacement is drawn from.", low=2)
    inferdpt_queries: int = _opt(4, "InferDPT: prompts each client asks per round (from its "
                                 "own data).", low=1)
    # --- evaluation
    server_eval: bool = _opt(True, "Evaluate the global model on the held-out test set "
                             "every round (round 0 = zero-shot base model).")
    eval_metric: str = _opt("auto", "Task metric: accuracy for classification, ROUGE-L for "
                            "instruction, perplexity for lm.", EVAL_METRICS)
    accuracy_by: str = _opt("likelihood", "Classification accuracy: `likelihood` picks the "
                            "label whose first token is most likely after the prompt (labels "
                            "with a shared first token: highest full-label log-likelihood); "
                            "`generation`: greedy output starts with the label.",
                            ("likelihood", "generation"))
    eval_batch_size: int = _opt(8, "Evaluation batch size.", low=1)
    max_new_tokens: int = _opt(32, "Generation length for ROUGE-L.", low=1)
    # --- outputs
    output_dir: str = _opt("outputs", "Folder under which each run gets its own folder.")
    run_name: str = _opt("", "Run folder name (empty = algorithm + timestamp).")
    resume_from: str = _opt("", "A previous run folder: continue from its last round.")
    save_every_round: bool = _opt(True, "Save the global adapter/model after every round.")
    best_metric: str = _opt("", "Keep the round that scores best on this round metric in "
                            "`best/` (the same artefact as `round-XXX/`): `server_val_<m>` "
                            "(needs server-val-size > 0) or `eval_<m>` (the clients' "
                            "aggregated validation, needs fraction-evaluate > 0), e.g. "
                            "`server_val_accuracy`; names ending in loss or perplexity are "
                            "minimised, the rest maximised. Test metrics (`server_<m>`) are "
                            "not allowed: selecting on them biases the reported test numbers. "
                            "Empty = off.")
    plots: bool = _opt(True, "Write PNG plots at the end of the run.")
    tracker: str = _opt("none", "Experiment tracker for round metrics, bytes, epsilon and "
                        "timings: tensorboard (event files in the run folder), mlflow or wandb "
                        "(optional extra `tracking`; see fatellm_flwr/tracking.py).",
                        ("none", "tensorboard", "mlflow", "wandb"))
    log_level: str = _opt("INFO", "Log level of the server and client apps (third-party "
                          "deprecation noise is filtered at any level).",
                          ("DEBUG", "INFO", "WARNING", "ERROR"))
    # --- fault injection (testing fault tolerance)
    fail_partitions: str = _opt("", "Comma-separated partition ids whose fit raises an "
                                "injected error (to exercise failure handling and SecAgg+ "
                                "dropout); empty = none.")

    @property
    def failing_partitions(self) -> set[int]:
        try:
            return {int(p) for p in self.fail_partitions.split(",") if p.strip()}
        except ValueError as e:
            raise ConfigError(f"fail-partitions={self.fail_partitions!r} must be "
                              "comma-separated integers") from e

    @property
    def lora_rank_list(self) -> list[int]:
        """``lora-ranks`` as integers (empty when not set)."""
        try:
            ranks = [int(r) for r in self.lora_ranks.split(",") if r.strip()]
        except ValueError as e:
            raise ConfigError(f"lora-ranks={self.lora_ranks!r} must be comma-separated "
                              "integers >= 1, e.g. '4,8,16'") from e
        if any(r < 1 for r in ranks):
            raise ConfigError(f"lora-ranks={self.lora_ranks!r} must be comma-separated "
                              "integers >= 1, e.g. '4,8,16'")
        return ranks

    @property
    def slm_model_list(self) -> list[str]:
        return [m.strip() for m in self.slm_models.split(",") if m.strip()]

    @property
    def flexlora(self) -> bool:
        """Whether homo aggregates LoRA with FlexLoRA."""
        return self.lora_aggregation == "flexlora" or (
            self.lora_aggregation == "auto" and len(set(self.lora_rank_list)) > 1)

    # ----------------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        """The run-config keys, in declaration order."""
        return [f.name.replace("_", "-") for f in dataclasses.fields(cls)]

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> Config:
        """Validate a Flower run config (kebab-case keys) and build a :class:`Config`."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in fields:
                hint = difflib.get_close_matches(key, cls.keys(), n=1)
                extra = f" Did you mean {hint[0]!r}?" if hint else ""
                raise ConfigError(f"unknown run-config key {key!r}.{extra} "
                                  f"Allowed keys: {', '.join(cls.keys())}")
            values[name] = _coerce(key, value, fields[name])
        cfg = cls(**values)
        cfg._check_combinations()
        return cfg

    def to_run_config(self) -> dict[str, Any]:
        """The inverse of :meth:`from_run_config` (kebab-case keys)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (validated again)."""
        return Config.from_run_config({**self.to_run_config(),
                                       **{k.replace("_", "-"): v for k, v in changes.items()}})

    @property
    def label_list(self) -> tuple[str, ...]:
        """``labels`` as a tuple (order kept, blanks and duplicates dropped)."""
        out: list[str] = []
        for name in (x.strip() for x in self.labels.split(",")):
            if name and name not in out:
                out.append(name)
        return tuple(out)

    @property
    def target_module_list(self) -> list[str] | None:
        names = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        return names or None

    def _check_combinations(self) -> None:
        _ = self.failing_partitions
        self._check_heterogeneous()
        self._check_fedipr_inferdpt()
        from .device import check_device_spec

        try:
            check_device_spec(self.device)
        except ValueError as e:
            raise ConfigError(f"run-config key 'device' has value {self.device!r}; allowed: "
                              "auto, cpu, cuda, cuda:N (N = GPU index), mps") from e
        self._check_best_metric()
        if self.node_data_path and "{partition-id}" not in self.node_data_path:
            raise ConfigError(f"run-config key 'node-data-path' has value "
                              f"{self.node_data_path!r}; it must contain '{{partition-id}}'")
        if self.labels and len(self.label_list) < 2:
            raise ConfigError(f"run-config key 'labels' has value {self.labels!r}; it must "
                              "name at least 2 distinct comma-separated labels")
        if self.min_available_clients < self.min_fit_clients:
            raise ConfigError(
                f"min-available-clients={self.min_available_clients} is smaller than "
                f"min-fit-clients={self.min_fit_clients}; it must be >= min-fit-clients")
        if self.local_steps == 0 and self.local_epochs == 0:
            raise ConfigError("local-steps=0 and local-epochs=0: set one of them > 0")
        if self.peft_last_layers and self.peft_method != "lora":
            raise ConfigError(f"peft-last-layers={self.peft_last_layers} applies to "
                              f"peft-method 'lora' only, not {self.peft_method!r} (peft's "
                              "IA3 and soft prompts have no per-layer selection); set "
                              "peft-last-layers=0")
        if self.peft_last_layers and self.algorithm in ("offsite", "fedkseed"):
            raise ConfigError(f"peft-last-layers={self.peft_last_layers} does not apply to "
                              f"algorithm={self.algorithm!r} (offsite tunes the emulator's "
                              "offsite-bottom/offsite-top blocks, fedkseed all weights); set "
                              "peft-last-layers=0")
        if self.aggregator == "fedprox" and self.proximal_mu == 0:
            raise ConfigError("aggregator='fedprox' needs proximal-mu > 0 (got 0)")
        if self.dp_sgd and (self.dp_noise_multiplier > 0) == (self.dp_target_epsilon > 0):
            raise ConfigError(
                "dp-sgd=true needs exactly one of dp-noise-multiplier > 0 or "
                f"dp-target-epsilon > 0 (got {self.dp_noise_multiplier} and "
                f"{self.dp_target_epsilon})")
        if (self.client_dp.endswith("-adaptive") and self.client_dp_noise_multiplier > 0
                and 0 < self.client_dp_clipped_count_stddev
                <= self.client_dp_noise_multiplier / 2):
            raise ConfigError(
                f"client-dp-clipped-count-stddev={self.client_dp_clipped_count_stddev} is too "
                f"small for client-dp-noise-multiplier={self.client_dp_noise_multiplier}: "
                "adaptive clipping splits that noise between the update and the clipped count "
                "(Andrew et al. 2021), which needs client-dp-clipped-count-stddev > "
                f"client-dp-noise-multiplier / 2 = {self.client_dp_noise_multiplier / 2}; "
                "raise it, or set 0 for max(sampled clients / 20, client-dp-noise-multiplier)")
        if self.secure_aggregation and self.client_dp.startswith("server-"):
            raise ConfigError(
                f"client-dp={self.client_dp!r} cannot run with secure-aggregation=true: "
                "server-side clipping needs each client's individual update, which SecAgg+ "
                "hides from the server; use client-dp='client-fixed' or 'client-adaptive'")
        if self.secure_aggregation and self.algorithm == "fedkseed":
            raise ConfigError(
                "secure-aggregation=true does not apply to algorithm='fedkseed': its "
                "(seed index, scalar) pairs are not summable vectors")
        if self.secure_aggregation and (
                self.secagg_reconstruction_threshold > self.secagg_num_shares):
            raise ConfigError(
                f"secagg-reconstruction-threshold={self.secagg_reconstruction_threshold} "
                f"exceeds secagg-num-shares={self.secagg_num_shares}")


    def _check_best_metric(self) -> None:
        """server-val-size / best-metric combinations that cannot run."""
        if self.server_val_size and self.server_eval_dataset == "none":
            raise ConfigError(f"server-val-size={self.server_val_size} needs data on the "
                              "server, but server-eval-dataset='none'; set server-val-size=0 "
                              "(best-metric can use the clients' `eval_<m>` instead)")
        m = self.best_metric
        if not m:
            return
        if not re.fullmatch(r"(server_val|eval)_[a-z0-9_]+", m):
            raise ConfigError(f"run-config key 'best-metric' has value {m!r}; allowed: "
                              "server_val_<metric> (e.g. server_val_accuracy, server_val_loss)"
                              " or eval_<metric> (e.g. eval_loss), or empty; test metrics "
                              "(server_<metric>) would bias the reported test numbers")
        if m.startswith("server_val_") and self.server_val_size == 0:
            raise ConfigError(f"best-metric={m!r} needs server-val-size > 0 (the server's "
                              "validation set), got 0")
        if m.startswith("eval_") and self.fraction_evaluate == 0:
            raise ConfigError(f"best-metric={m!r} needs the clients' evaluation: "
                              "fraction-evaluate > 0, got 0")
        if m.startswith("eval_") and self.algorithm == "fedmkt":
            raise ConfigError(f"best-metric={m!r}: FedMKT's clients evaluate their own small "
                              "LMs, not the server's LLM; use server_val_<metric> (with "
                              "server-val-size > 0)")
        if self.algorithm == "inferdpt":
            raise ConfigError("best-metric does not apply to algorithm='inferdpt': it trains "
                              "nothing, so there is no round to select")

    def _check_fedipr_inferdpt(self) -> None:
        """FedIPR and InferDPT combinations that cannot run."""
        if self.fedipr and self.algorithm != "homo":
            raise ConfigError(f"fedipr=true needs algorithm='homo', got {self.algorithm!r}")
        if self.fedipr and self.peft_method not in ("lora", "ia3"):
            raise ConfigError(f"fedipr=true needs peft-method 'lora' or 'ia3' (the norm "
                              f"scales are trained next to the adapter), got "
                              f"{self.peft_method!r}")
        if self.fedipr and self.fedipr_carriers == "lora" and self.peft_method != "lora":
            raise ConfigError(f"run-config key 'fedipr-carriers' has value 'lora', which needs "
                              f"peft-method='lora' (got {self.peft_method!r}); allowed with "
                              f"{self.peft_method!r}: 'norm'")
        if self.fedipr and self.flexlora:
            raise ConfigError("fedipr=true cannot run with FlexLoRA (lora-aggregation=flexlora"
                              " or differing lora-ranks)")
        if self.algorithm == "inferdpt":
            for key, on in (("secure-aggregation", self.secure_aggregation),
                            ("dp-sgd", self.dp_sgd), ("client-dp", self.client_dp != "none")):
                if on:
                    raise ConfigError(f"{key} does not apply to algorithm='inferdpt': clients "
                                      "send perturbed prompts (text), not weight updates")

    def _check_heterogeneous(self) -> None:
        """FlexLoRA and FedMKT combinations that cannot run."""
        _ = self.lora_rank_list
        if self.flexlora and self.algorithm == "homo":
            if self.peft_method != "lora":
                raise ConfigError(f"lora-aggregation=flexlora (or differing lora-ranks) needs "
                                  f"peft-method='lora', got {self.peft_method!r}")
            if self.aggregator not in ("fedavg", "fedprox"):
                raise ConfigError(f"aggregator={self.aggregator!r} cannot run with FlexLoRA "
                                  "(lora-aggregation=flexlora or differing lora-ranks): it "
                                  "averages products B·A; use aggregator='fedavg' or 'fedprox'")
            if self.secure_aggregation or self.client_dp != "none":
                raise ConfigError("FlexLoRA (lora-aggregation=flexlora or differing "
                                  "lora-ranks) cannot run with secure-aggregation or client-dp:"
                                  " clients' tensors have different shapes")
        if self.algorithm != "fedmkt":
            return
        if not self.slm_model_list:
            raise ConfigError("slm-models is empty: name at least one small LM, e.g. "
                              "'builtin:smollm2-135m-instruct'")
        if self.public_dataset and self.public_dataset == self.dataset:
            raise ConfigError(f"public-dataset={self.public_dataset!r} is the clients' dataset:"
                              " FedMKT's public set must be data every party may see (empty = "
                              "a held-out slice no client receives)")
        if not self.public_dataset and self.fedmkt_public_size >= self.test_size:
            raise ConfigError(f"fedmkt-public-size={self.fedmkt_public_size} must be smaller "
                              f"than test-size={self.test_size}: with public-dataset='' the "
                              "public set is carved out of the server's held-out test split")
        for key, on in (("secure-aggregation", self.secure_aggregation),
                        ("dp-sgd", self.dp_sgd), ("client-dp", self.client_dp != "none")):
            if on:
                raise ConfigError(f"{key} does not apply to algorithm='fedmkt': clients send "
                                  "top-k logits on public data, not summable weight updates")

def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    """Convert ``value`` to the field's type and check its bounds/choices."""
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool,
                                                     "str": str}[f.type]
    meta = f.metadata
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            value = value.lower() in ("true", "1")
        if not isinstance(value, bool):
            raise ConfigError(f"run-config key {key!r} must be true or false, got {value!r}")
    elif kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or
                                           (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"run-config key {key!r} must be an integer, got {value!r}")
        value = int(value)
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"run-config key {key!r} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"run-config key {key!r} must be finite, got {value!r}")
    else:
        if not isinstance(value, str):
            raise ConfigError(f"run-config key {key!r} must be a string, got {value!r}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"run-config key {key!r} has value {value!r}; "
                          f"allowed: {', '.join(map(str, choices))}")
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta["low_open"] and value == low)):
        op = ">" if meta["low_open"] else ">="
        raise ConfigError(f"run-config key {key!r} has value {value!r}; it must be {op} {low}")
    if high is not None and (value > high or (meta["high_open"] and value == high)):
        op = "<" if meta["high_open"] else "<="
        raise ConfigError(f"run-config key {key!r} has value {value!r}; it must be {op} {high}")
    return value


def config_table_markdown(app_config: Mapping[str, Any] | None = None) -> str:
    """The README table of every run-config key with its default and meaning.

    ``app_config`` is ``[tool.flwr.app.config]`` of pyproject.toml: what ``flwr run .``
    uses. Where it differs from the library default (:class:`Config`), both are shown.
    """

    def show(v: Any) -> str:
        return f"`{str(v).lower() if isinstance(v, bool) else repr(v)}`"

    app_config = app_config or {}
    rows = ["| key | `flwr run .` default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(Config):
        key = f.name.replace("_", "-")
        shown = show(f.default)
        if key in app_config and app_config[key] != f.default:
            shown = f"{show(app_config[key])} (library: {shown})"
        choices = f.metadata.get("choices")
        help_ = f.metadata["help"] + (f" One of: {', '.join(choices)}." if choices else "")
        rows.append(f"| `{key}` | {shown} | {help_} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------- offline check
def app_config_defaults(project_dir: str | Path | None = None) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the app's pyproject.toml (``project_dir``, else this
    source checkout), flattened as Flower reads it; ``{}`` when there is none (an installed
    wheel), and then the library defaults of :class:`Config` apply."""
    from flwr.common.config import flatten_dict

    root = Path(project_dir) if project_dir is not None else Path(__file__).resolve().parents[1]
    path = root / "pyproject.toml"
    if not path.is_file():
        if project_dir is not None:
            raise ConfigError(f"no pyproject.toml in {str(root)!r}")
        return {}
    with path.open("rb") as f:
        app = tomllib.load(f).get("tool", {}).get("flwr", {}).get("app", {})
    return flatten_dict(app.get("config", {}))


def parse_run_config(overrides: str) -> dict[str, Any]:
    """``k=v k2="s"`` pairs exactly as ``flwr run --run-config`` parses them (values are TOML:
    strings need quotes). A pair that is not valid TOML raises :class:`ConfigError` naming it."""
    import click
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args([overrides]) if overrides.strip() else {}
    except (click.ClickException, ValueError) as e:
        for pair in overrides.split():
            try:
                parse_config_args([pair])
            except (click.ClickException, ValueError):
                key, _, value = pair.partition("=")
                raise ConfigError(
                    f"run-config pair {pair!r} is not valid: the value of {key!r} must be a "
                    f"TOML bool, number or quoted string (e.g. {key}=\"{value}\")") from e
        raise ConfigError(f"run-config {overrides!r} is not valid: {e}") from e


def check_run_config(overrides: str | Mapping[str, Any] = "",
                     project_dir: str | Path | None = None) -> Config:
    """Validate ``--run-config`` overrides offline, as a run would, and return the Config.

    ``overrides`` is the string given to ``flwr run --run-config`` (``k=v k2="s"``) or an
    already-parsed mapping. They are laid over pyproject's ``[tool.flwr.app.config]``
    defaults, like the SuperLink does; but where the SuperLink refuses an unknown key with
    only "Invalid run configuration", this raises :class:`ConfigError` naming the key (with
    the closest known key), and every bad value or combination as a run would.
    """
    parsed = parse_run_config(overrides) if isinstance(overrides, str) else dict(overrides)
    defaults = app_config_defaults(project_dir)
    unknown = [k for k in parsed if k not in defaults] if defaults else []
    for key in unknown:
        if key.replace("-", "_") in {f.name for f in dataclasses.fields(Config)}:
            raise ConfigError(f"run-config key {key!r} is a Config field but missing from "
                              "pyproject.toml [tool.flwr.app.config], so Flower refuses it: "
                              "run scripts/sync_config.py")
    return Config.from_run_config({**defaults, **parsed})


def main(argv: list[str] | None = None) -> int:
    """``python -m fatellm_flwr.config "k=v k2='s'"``: print ``OK`` or the ConfigError."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    try:
        check_run_config(" ".join(args))
    except ConfigError as e:
        print(f"ConfigError: {e}", file=sys.stderr)
        return 2
    print("OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
