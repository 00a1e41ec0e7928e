"""`prefopt check`: what can be validated before a GPU-hour is spent."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefopt.data.sources import check_problem
from prefopt.experiment import STAGES, ExperimentConfig, ref_stage, resolve, section, stage_inputs
from prefopt.models.loading import is_local_model_path


def _paths_in(obj, key=""):
    """(key, value) for every string field that names a file or dataset path."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _paths_in(getattr(obj, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(obj, list):  # a dataset mixture's parts
        for i, item in enumerate(obj):
            yield from _paths_in(item, f"{key}[{i}]")
    elif isinstance(obj, str) and key.endswith(".path"):
        yield key, obj


MODEL_FIELDS = ("model", "policy", "reward_model", "ref_model")


def _models_in(obj, key=""):
    """(key, value) for every field that names a model: a folder, a Hub id or `stage:NAME`."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            value, name = getattr(obj, f.name), f"{key}.{f.name}" if key else f.name
            if f.name in MODEL_FIELDS and isinstance(value, str) and value:
                yield name, value
            elif f.name == "policies" and isinstance(value, dict):
                yield from ((f"{name}.{k}", v) for k, v in value.items() if isinstance(v, str))
            elif dataclasses.is_dataclass(value):
                yield from _models_in(value, name)


def missing_model(path: str) -> str | None:
    """A local model path (as the loaders read it) that is not here: the `{here}`-slot text of
    `data.sources.check_problem`'s "missing"."""
    if path.startswith("stage:") or not is_local_model_path(path) or Path(path).expanduser().exists():
        return None
    return f"model folder {path!r} does not exist{{here}}"


def keep_recipe_batch(cfg: ExperimentConfig) -> tuple[list[str], list[str], list[str]]:
    """Keep each training stage's global batch at its `recipe_global_batch` whatever the launch: the gradient
    accumulation becomes recipe_global_batch / (processes x per-device batch) when that divides, and the stage's
    section is changed in place. Returns (notes, problems, overrides): a note per changed stage, a one-line problem
    naming the keys where it does not divide, and the `--stage.gradient_accumulation_steps=N` overrides that give
    the stages `prefopt run` launches the same value (they read the YAML again).

    Called by `prefopt check` and `prefopt run` before anything else, so both print the same fingerprints. Four
    nodes of 8 GPUs with the gemma recipe (per-device 2, accumulation 8 for 8 GPUs) trained with a global batch of
    512 instead of 128; now accumulation 2 keeps 128."""
    notes, problems, overrides = [], [], []
    n = launch_processes(cfg)
    for stage in cfg.stages:
        sec = getattr(cfg, stage)
        want = getattr(sec, "recipe_global_batch", 0)
        if not STAGES[stage][1] or not want or not hasattr(sec, "gradient_accumulation_steps"):
            continue  # PPO's rollout_batch_size is global already: the processes split it
        per_step = n * sec.per_device_train_batch_size
        if per_step * sec.gradient_accumulation_steps == want:
            continue
        if want % per_step:
            problems.append(
                f"{stage}: the recipe's global batch {want} ({stage}.recipe_global_batch) is not a multiple of "
                f"{n} processes x per-device batch {sec.per_device_train_batch_size} = {per_step} (launch.num_processes, "
                f"{stage}.per_device_train_batch_size); change {stage}.per_device_train_batch_size so it divides, "
                f"or set {stage}.recipe_global_batch: 0 to train with processes x per-device x "
                f"{stage}.gradient_accumulation_steps")
            continue
        accum = want // per_step
        notes.append(f"{stage}: gradient_accumulation_steps {sec.gradient_accumulation_steps} -> {accum}, so the global "
                     f"batch stays at the recipe's {want} ({n} processes x per-device "
                     f"{sec.per_device_train_batch_size} x {accum}; {stage}.recipe_global_batch)")
        sec.gradient_accumulation_steps = accum
        overrides.append(f"--{stage}.gradient_accumulation_steps={accum}")
    return notes, problems, overrides


def memory_plan(cfg: ExperimentConfig) -> tuple[list[str], list[str]]:
    """(printed lines, warnings): each stage's per-GPU memory estimate under the launch (prefopt.memory_plan)."""
    from prefopt.memory_plan import experiment_plans, format_plans

    backend, plans = experiment_plans(cfg, launch_processes(cfg), accelerate_file(cfg), cfg.launch.gpu_memory_gb)
    return format_plans(backend, plans, cfg.launch.gpu_memory_gb)


def accelerate_file(cfg: ExperimentConfig) -> dict:
    """The experiment's accelerate config file as a dict ({} without one, or when it is missing: reported apart)."""
    path = Path(cfg.launch.accelerate_config) if cfg.launch.accelerate_config else None
    if path is None or not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def launch_processes(cfg: ExperimentConfig) -> int:
    """How many processes a training stage gets: launch.num_processes, or the accelerate file's own count when
    launch.num_processes is 1 (`prefopt run` then passes no --num_processes, and the file decides)."""
    if cfg.launch.num_processes > 1:
        return cfg.launch.num_processes
    return int(accelerate_file(cfg).get("num_processes", 1) or 1)


def ppo_launch_problems(cfg: ExperimentConfig, sec) -> list[str]:
    """What the ppo stage would refuse at start-up under this launch (ppo.setup.check_world and
    check_distributed_type), found before any process starts."""
    out = []
    n = launch_processes(cfg)
    for key in ("rollout_batch_size", "mini_batch_size"):
        if getattr(sec, key) % n:
            out.append(f"ppo.{key} ({getattr(sec, key)}) must be a multiple of the number of processes ({n}, "
                       "launch.num_processes or the accelerate config's): each process takes an equal share of the "
                       "global batch")
    local = sec.rollout_batch_size // n
    if sec.generation_chunk and local and local % sec.generation_chunk:
        out.append(f"ppo.generation_chunk ({sec.generation_chunk}) must divide each process's share of "
                   f"ppo.rollout_batch_size ({local})")
    conf = accelerate_file(cfg)
    kind = str(conf.get("distributed_type", "NO")).upper()
    version = int((conf.get("fsdp_config") or {}).get("fsdp_version", 1))
    if kind == "FSDP" and version != 2:
        out.append(f"ppo: launch.accelerate_config {cfg.launch.accelerate_config!r} is FSDP version {version}; the "
                   "ppo stage runs under FSDP2 (fsdp_config.fsdp_version: 2, as experiments/accelerate/fsdp2.yaml)")
    elif kind not in ("NO", "MULTI_GPU", "MULTI_CPU", "FSDP"):
        out.append(f"ppo: launch.accelerate_config {cfg.launch.accelerate_config!r} is {kind}; the ppo stage runs "
                   "on one process, under DDP (MULTI_GPU / MULTI_CPU) or FSDP2")
    return out


def lora_launch_problem(cfg: ExperimentConfig, stage: str, sec) -> str | None:
    """LoRA under an accelerate config that shards the weights (FSDP, DeepSpeed ZeRO-3): the stage would refuse
    it at start-up (models.check_lora_mergeable), since the adapter is merged into whole weights at save time."""
    lora = getattr(sec, "lora", None)
    if lora is None or not lora.enabled:
        return None
    conf = accelerate_file(cfg)
    kind = str(conf.get("distributed_type", "NO")).upper()
    zero = int((conf.get("deepspeed_config") or {}).get("zero_stage", 0) or 0)
    if kind == "FSDP" or (kind == "DEEPSPEED" and zero == 3):
        name = "FSDP" if kind == "FSDP" else "DeepSpeed ZeRO-3"
        return (f"{stage}.lora.enabled: true under {name} (launch.accelerate_config "
                f"{cfg.launch.accelerate_config!r}), which shards the weights the adapter is merged into at save "
                "time; train without LoRA there, or launch with DDP or DeepSpeed ZeRO-1/2")
    return None


def rm_format_problem(cfg: ExperimentConfig, stage: str, sec) -> str | None:
    """`rm_format: chat` that cannot work, found without loading weights: the experiment's own likelihood reward
    model, or a local reward-model folder whose tokenizer has no chat template (a hub id is checked when the stage
    loads it: `check` downloads nothing)."""
    if getattr(sec, "rm_format", None) != "chat" or sec.reward_fn or not sec.reward_model:
        return None
    key, ref = f"{stage}.rm_format", sec.reward_model
    if ref.startswith("stage:"):
        if ref_stage(ref) == "reward" and "reward" in cfg.stages and cfg.reward.kind == "likelihood":
            return (f"{key}: chat needs a sequence-classification reward model, but {ref} is a likelihood reward "
                    f"model (reward.kind: likelihood) trained on the policy's text (use {key}: policy)")
        return None
    if not Path(ref).expanduser().is_dir():
        return None
    from prefopt.scoring.scorer import rm_input_format

    try:
        rm_input_format("chat", str(Path(ref).expanduser()), key,
                        trust_remote_code=getattr(sec, "trust_remote_code", False))
    except (OSError, ValueError) as e:  # ConfigError is a ValueError
        return str(e)
    return None


def unwritten_stage_file(cfg: ExperimentConfig, stage: str, sec, key: str, value: str) -> str | None:
    """A `stage:NAME/FILE` dataset that no stage of this experiment writes and that is not on disk from an earlier
    run: the defaults read the task's files, which `task.name: none` does not write, and evaluate's prompts are
    read even when `task` is not among the stages. Found here, not when the stage opens the file hours later."""
    if not value.startswith("stage:") or "/" not in value:
        return None
    if stage == "evaluate" and key.split(".")[1] != ("prompts" if sec.split == "test" else "validation_prompts"):
        return None  # the other split's prompts are not read
    name = ref_stage(value)
    if stage != "evaluate" and name not in cfg.stages:
        return None  # said once per stage above ("is not in this experiment's stages")
    if name in cfg.stages and not (name == "task" and cfg.task.name == "none"):
        return None
    if Path(resolve(cfg, value, model=False)).exists():
        return None
    why = ("task.name is none, so the task stage writes no files" if name in cfg.stages else
           f"'{name}' is not in this experiment's stages")
    fix = (f"name your own data ({key[:-len('.path')]}: {{path: FILE}})" if key.endswith(".path") else
           f"set {key.split('[')[0]} to your own files")
    return f"{key}: reads {value}, but {why}: {fix}"


def problems_and_warnings(cfg: ExperimentConfig, here: bool = False) -> tuple[list[str], list[str]]:
    """What stops a run (problems) and what may (warnings). `here`: the run is on this machine (`prefopt run`), so
    a data file or model folder missing here is a problem; `prefopt check` may check a config meant for another
    machine, where it is a warning."""
    problems: list[str] = []
    warnings: list[str] = []

    def missing(key: str, text: str) -> None:
        if here:
            problems.append(f"{key}: {text.replace('{here}', '')}")
        else:
            warnings.append(f"{key}: {text.replace('{here}', ' here (fine if the GPU machine has it)')}")

    for stage in cfg.stages:
        sec = section(cfg, stage)
        # inputs that no stage of this experiment produces
        try:
            inputs = stage_inputs(cfg, stage)
        except ValueError as e:
            problems.append(str(e))
            inputs = []
        for name in inputs:
            if name not in cfg.stages and stage != "evaluate":
                problems.append(f"{stage}: reads stage '{name}' (a `stage:{name}` reference) but '{name}' is not in "
                                "this experiment's stages")
        # dataset files that are neither produced here nor on disk (a Hub id: its form only, nothing is fetched)
        paths = list(_paths_in(sec, stage))
        if stage == "base" and not cfg.base.as_named:  # the text the tokenizer learns from
            paths += [(f"base.tokenizer_data[{i}]", v) for i, v in enumerate(cfg.base.tokenizer_data)]
        for key, value in paths:
            problem = unwritten_stage_file(cfg, stage, sec, key, value)
            if problem:
                problems.append(problem)
            found = check_problem(value)
            if found and found[0] == "missing":
                missing(key, found[1])
            elif found:
                problems.append(f"{key}: {found[1]}")
        models = [] if stage == "base" and not cfg.base.as_named else list(_models_in(sec, stage))
        for key, value in models:
            text = missing_model(value)
            if text:
                missing(key, text)
        for problem in (rm_format_problem(cfg, stage, sec), lora_launch_problem(cfg, stage, sec)):
            if problem:
                problems.append(problem)
        if stage == "ppo":
            problems += ppo_launch_problems(cfg, sec)
        # the global batch the recipe states (a stage with gradient accumulation: keep_recipe_batch below)
        if STAGES[stage][1] and hasattr(sec, "global_batch") and not hasattr(sec, "gradient_accumulation_steps"):
            got = sec.global_batch(launch_processes(cfg))
            want = getattr(sec, "recipe_global_batch", 0)
            if want and got != want:
                warnings.append(f"{stage}: global batch is {got} ({stage}.rollout_batch_size, split over the "
                                f"processes) but the recipe states {want} ({stage}.recipe_global_batch)")
    problems += keep_recipe_batch(cfg)[1]  # (the derived accumulation is applied in place: see its docstring)
    if "evaluate" in cfg.stages:
        from prefopt.evaluate.suite import suite_warnings

        for kind, key, text in suite_warnings(cfg.evaluate.suite):
            if kind == "missing":
                missing(key, text)
            else:
                warnings.append(f"{key}: {text}")
    if cfg.launch.accelerate_config and not Path(cfg.launch.accelerate_config).exists():
        problems.append(f"launch.accelerate_config: {cfg.launch.accelerate_config!r} does not exist")
    return problems, warnings
