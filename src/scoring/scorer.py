"""The scorer library: how a reward model reads a prompt and response, loading one (classifier, likelihood or hub
model with its own code), and scoring texts in batches. The `score` stage (prefopt.score.recipe), PPO's reward and
evaluation's reward-model win rate all score through it.

What the reward model reads is what it was trained on: for a classifier (TRL's RewardTrainer) prompt text +
response + EOS, right padded, the score being the head's first logit (or a hub model's `score` field) at the token
the model reads on that text alone, whatever its lookup (`batch_pad_id`); for a likelihood
reward model (scoring/likelihood.py) beta times the mean log-prob of the response tokens and EOS given the prompt.

Which prompt text (`rm_format`, on `score`, `ppo` and `evaluate`): `policy` gives the classifier the policy's rendered
prompt, as the `reward` stage trained it; `chat` gives it the user's own prompt (the row's instruction and input,
or its chat messages) and the response as one conversation in the reward model's own chat template, tokenized by
its own tokenizer with one BOS: what hub reward models (Skywork-Reward, ArmoRM) were trained on. `auto` (the
default) is `chat` for a classifier prefopt did not train (no `reward_model.json`) whose tokenizer has a chat
template, else `policy`. Responses always reach the reward model as text, so its vocabulary may differ from the
policy's.
"""


from __future__ import annotations

from pathlib import Path

from prefopt.config import ConfigError
from prefopt.data.templates import encode_many, prompt_messages
from prefopt.io import content_hash, weights_sha256
from prefopt.scoring.batches import by_length


def reward_text(prompt: str, response: str, eos_token: str | None) -> str:
    """The text a reward model scores: rendered prompt + response + EOS (as RewardTrainer builds it)."""
    text = prompt + response
    if eos_token and not text.endswith(eos_token):
        text += eos_token
    return text


def chat_reward_text(messages: list[dict], response: str, tokenizer) -> str:
    """The text a hub reward model scores (`rm_format: chat`): the user's turns and the response as the assistant's
    turn, in the reward model's own chat template, as Skywork-Reward's and ArmoRM's model cards build it. No EOS is
    added: the template closes the assistant turn itself. A template that writes BOS (Llama-3's) keeps one BOS,
    since `score_texts` tokenizes through `encode`."""
    return tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)


class ClassifierScorer:
    """Scores (prompt, response) with a sequence classifier, as the model scores each text alone: a prompt
    given as text is the policy's rendering (prompt + response + EOS, what TRL's RewardTrainer trains on), one given
    as chat messages goes through the reward model's own chat template (`chat_reward_text`)."""

    kind = "classifier"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def score(self, prompts: list[str | list[dict]], responses: list[str], batch_size: int = 64,
              max_length: int = 512, progress=None) -> list[float]:
        texts = [chat_reward_text(p, r, self.tokenizer) if isinstance(p, list)
                 else reward_text(p, r, self.tokenizer.eos_token) for p, r in zip(prompts, responses)]
        return score_texts(self.model, self.tokenizer, texts, batch_size, max_length, progress)


def rm_input_format(rm_format: str, path: str, key: str, from_stage: bool = False,
                    trust_remote_code: bool = False) -> str:
    """`policy` or `chat`: what `rm_format` (`key`, e.g. `score.rm_format`) means for the reward model at `path`.
    Reads its `reward_model.json` and tokenizer, not its weights, so a wrong setting stops the stage before any
    scoring (and `prefopt check` before any stage).

    `auto`: whatever prefopt trained (a `stage:` reference, or a folder with `reward_model.json`) read the policy's
    text in training and keeps reading it; any other reward model whose tokenizer has a chat template was trained
    on that template."""
    from prefopt.scoring.likelihood import read_meta

    if rm_format == "policy":
        return "policy"
    meta = read_meta(path) if Path(path).is_dir() else None
    if rm_format == "auto" and (from_stage or meta is not None):
        return "policy"
    if meta is not None and meta["kind"] == "likelihood":
        raise ConfigError(f"{key}: chat needs a sequence-classification reward model, but {path} is a likelihood "
                          f"reward model trained on the policy's text (use {key}: policy)")
    from prefopt.models.loading import load_tokenizer

    has_template = bool(getattr(load_tokenizer(path, trust_remote_code=trust_remote_code), "chat_template", None))
    if rm_format == "chat" and not has_template:
        raise ConfigError(f"{key}: chat, but the reward model {path} has no chat template in its tokenizer (use "
                          f"{key}: policy)")
    return "chat" if has_template else "policy"


def rm_prompt(row: dict, rendered: str, fmt: str, key: str, where: str = "") -> str | list[dict]:
    """What the reward model is given as `row`'s prompt: the policy's `rendered` text, or for `chat` the user's own
    turns from the row's data (`prompt_messages`), which `ClassifierScorer` puts in the reward model's template."""
    if fmt == "policy":
        return rendered
    messages = prompt_messages(row)
    if messages is None:
        raise ConfigError(f"{key}: chat needs each prompt as the user wrote it (Alpaca instruction/input or chat "
                          f"messages), but prompt_id {row.get('prompt_id')!r}{where} has only rendered text (use "
                          f"{key}: policy)")
    return messages


def reward_model_config(path: str, trust_remote_code: bool = False, key: str = "trust_remote_code"):
    """The reward model's transformers config, read before any weights load. A model that ships its own code
    without `trust_remote_code` is a one-line error naming the setting, in both of the ways a config says so: a
    `model_type` transformers does not know (its config class is remote too), or a known one (ArmoRM's is `llama`)
    whose `auto_map` names its own sequence classifier. transformers loads the second kind, untrusted, as its plain
    classifier with a new, random `score` head, without a word."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" not in str(e) or trust_remote_code:
            raise
        config = None
    own = (getattr(config, "auto_map", None) or {}).get("AutoModelForSequenceClassification")
    if config is None or (own and not trust_remote_code):
        raise ConfigError(f"the reward model {path} ships its own model code (auto_map in its config.json): set "
                          f"{key}: true to run it (only for a model you trust)")
    return config


def load_scorer(path: str, trust_remote_code: bool = False, key: str = "trust_remote_code", device: str | None = None,
                dtype=None):
    """A scorer (`.score(prompts, responses, batch_size, max_length)`, `.model`, `.tokenizer`) for a reward-model
    folder or hub id, eval mode: a likelihood reward model (a causal LM with `reward_model.json`,
    scoring/likelihood.py) or any AutoModelForSequenceClassification. By default on the GPU in bf16 if there is one
    (the score and evaluate stages); a caller that shards the model itself (PPO under FSDP) passes device="cpu" and
    its dtype, so the whole model never lands on one GPU before sharding.

    A causal LM folder without `reward_model.json` would get a random head: refused, train one first."""
    import torch

    from prefopt.models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from prefopt.scoring.likelihood import LikelihoodScorer, read_meta

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    meta = read_meta(path) if Path(path).is_dir() else None
    if meta is not None and meta["kind"] == "likelihood":
        name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
        model = load_causal_lm(path, dtype=name).to(device).eval()
        return LikelihoodScorer(model, load_tokenizer(path, padding_side="right"), meta["beta"])
    config = reward_model_config(path, trust_remote_code, key)
    archs = getattr(config, "architectures", None) or []
    if archs and all(a.endswith("ForCausalLM") for a in archs):
        raise ValueError(f"{path} is a causal LM ({archs[0]}), not a reward model: train one with the `reward` stage "
                         "or name a sequence-classification checkpoint")
    # Every weight from the checkpoint (a missing head is refused, never scored at random); the pad id is chosen per
    # batch by `score_texts`.
    model = load_reward_model(path, trust_remote_code, num_labels=None, dtype=dtype, complete=True)
    tok = load_tokenizer(path, padding_side="right", trust_remote_code=trust_remote_code)
    return ClassifierScorer(model.to(device).eval(), tok)


def scorer_sha256(path: str) -> str:
    """What names a reward model in caches and provenance: its weights, and a likelihood reward model's
    `reward_model.json` (its beta scales every score; a classifier's marker changes none)."""
    from prefopt.scoring.likelihood import META, read_meta

    sha = weights_sha256(path)
    meta = read_meta(path) if Path(path).is_dir() else None
    return content_hash(sha, (Path(path) / META).read_text()) if meta and meta["kind"] == "likelihood" else sha


def batch_pad_id(own: int | None, rows: list[list[int]], vocab: int) -> int:
    """The id that right-pads a batch of token-id `rows` so the model reads each row where it reads it alone.

    A sequence classifier finds a row's last token from its pad id: transformers' *ForSequenceClassification take the
    rightmost token that is not the pad id (5.17 and 5.23 alike, `modeling_layers.py`), ArmoRM's own code the token
    before the first pad id, and with no pad id (a batch of one) the last position. Padding with the checkpoint's
    own pad id (`own`, when it is an id of the vocabulary) leaves each lookup where it lands on the row alone:
    trailing pad ids are skipped, and the first pad id is the row's own or the padding's first. Without one (none,
    or an id outside the embeddings), the row alone is read at its last token, the EOS or end-of-turn that closes
    it; padding with the tokenizer's stand-in pad (EOS for Llama-3, which ships none) would move both lookups off
    it, to the token before the final EOS or before the first end-of-turn. An id that occurs in no row of the
    batch, given to the model as its pad id for that forward (`score_texts`), makes both lookups read the last
    token."""
    if own is not None and 0 <= own < vocab:
        return own
    used = {i for r in rows for i in r}
    return next(i for i in range(vocab) if i not in used)


def score_texts(model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 512,
                progress=None) -> list[float]:
    """Reward of each text (already `reward_text`), batched, each equal to the model's score of the text alone
    (`batch_pad_id`). Texts are sorted by length so batches pad little."""
    import torch

    device = next(model.parameters()).device
    base = getattr(model, "module", model)  # the model itself under a DDP wrapper
    config = getattr(base, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    own = getattr(config, "pad_token_id", None)
    try:
        vocab = base.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        vocab = len(tokenizer)
    from prefopt.training.padding import right_pad

    cut = 0  # texts at the limit: the reward model read their first max_length tokens only

    def score_batch(idx: list[int]) -> list[float]:
        nonlocal cut
        # One BOS per text (`encode`): a prompt rendered by a chat template that writes BOS already has it.
        ids = encode_many([texts[i] for i in idx], tokenizer, truncation=True, max_length=max_length)
        cut += sum(len(x) >= max_length for x in ids)
        pad = batch_pad_id(own, ids, vocab)
        if config is None and tokenizer.pad_token_id is not None:
            pad = tokenizer.pad_token_id  # a model with no config to tell: padded as its tokenizer pads
        input_ids, mask = right_pad(ids, pad)
        if config is not None and pad != own:
            config.pad_token_id = pad  # for this forward only: the model's lookup then finds each row's end
        try:
            res = model(input_ids=input_ids.to(device), attention_mask=mask.to(device))
        finally:
            if config is not None:
                config.pad_token_id = own
        # Some hub reward models (ArmoRM) return a `score` field beside their multi-objective logits.
        scores = getattr(res, "score", None)
        return (scores if scores is not None else res.logits[:, 0]).float().reshape(-1).cpu().tolist()

    with torch.no_grad():
        scores = by_length([len(t) for t in texts], batch_size, score_batch, progress)
    if cut and _CUT_WARNINGS[0] < 5:  # said, not silent: a cut answer's score is not the answer's (its end and the
        _CUT_WARNINGS[0] += 1         # EOS read last are gone); five times a process (PPO scores every iteration)
        print(f"[reward model] WARNING {cut} of {len(texts)} texts reach the {max_length} tokens the reward model "
              "reads and were cut there: their scores are of the cut text (a reward model with a longer context, or "
              "shorter answers)" + ("; not said again in this process" if _CUT_WARNINGS[0] == 5 else ""), flush=True)
    return scores


_CUT_WARNINGS = [0]  # how many times this process has said so


def scoring_length(path: str, configured: int, key: str, trust_remote_code: bool = False,
                   trust_key: str = "trust_remote_code") -> int:
    """Tokens the reward model at `path` reads of each prompt + response: `configured` (the stage's `key`) when set,
    else (0) the model's own limit, the smaller of its config's `max_position_embeddings` and its tokenizer's
    `model_max_length` where each is a real number (a tokenizer without a limit says 1e30). A fixed default would
    cut answers of 4,096 tokens to their first 512 for a model that reads 8K. Reads the config and tokenizer, not
    the weights, so a wrong length stops the stage before any scoring.

    A configured length above the model's limit is a config error naming `key`: the model has no positions for the
    tokens past it."""
    from prefopt.models.loading import load_tokenizer

    try:
        config = reward_model_config(path, trust_remote_code, trust_key)
        tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    except OSError:
        if configured:  # unreadable here (not cached offline, a stand-in): loading the scorer says why, if it fails
            return configured
        raise
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limits = {"max_position_embeddings": getattr(text, "max_position_embeddings", None),
              "model_max_length": getattr(tok, "model_max_length", None)}
    limits = {k: int(v) for k, v in limits.items() if isinstance(v, (int, float)) and 0 < v < 1e9}
    if not limits:
        if configured:
            return configured
        raise ConfigError(f"{key}: the reward model {path} states no length limit (no max_position_embeddings in its "
                          f"config, no model_max_length in its tokenizer): set {key} to the tokens it reads")
    name = min(limits, key=limits.get)
    if configured > limits[name]:
        raise ConfigError(f"{key}: {configured} tokens, but the reward model {path} reads at most {limits[name]} "
                          f"({name}): set {key} to {limits[name]} or less, or 0 for its own limit")
    return configured or limits[name]
