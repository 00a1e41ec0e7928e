"""Two processes generate from one FSDP2-sharded policy (CPU, gloo) where process 0's response ends at its first
token and process 1's runs to max_new_tokens: with synced generation process 0 keeps taking part in the
collective forward passes until process 1 is done. Writes OUT_DIR/rank-N: that process's response length.

    PYTHONPATH=tests/fsdp_on_cpu accelerate launch --config_file tests/fsdp_on_cpu/fsdp2_cpu.yaml \
        tests/plugins/fsdp_generate.py MODEL_DIR OUT_DIR
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from prefopt.data.templates import encode
from prefopt.generation.base import Sampling
from prefopt.generation.hf import TransformersGenerator
from prefopt.models.loading import load_causal_lm, load_tokenizer
from prefopt.models.loading import place_frozen

path = sys.argv[1]
accelerator = Accelerator(cpu=True)
assert accelerator.distributed_type.value == "FSDP", accelerator.distributed_type
tok = load_tokenizer(path)
model = place_frozen(accelerator, load_causal_lm(path, dtype="float32"), True, "test")  # as PPO's reference
gen = TransformersGenerator(model, tokenizer=tok, batch_size=4, synced=True)
prompt = "Sort the numbers: 3 1 2"
with torch.no_grad():  # collective: both processes run it
    first = int(model(input_ids=torch.tensor([encode(prompt, tok)])).logits[0, -1].argmax())
if accelerator.process_index == 0:
    gen.eos_ids = [first]  # the greedy response ends at its first token here
else:
    gen.eos_ids = [len(tok) + 1]  # no token ends it: it runs to max_new_tokens
out = gen.generate([prompt], Sampling(n=1, temperature=0.0, top_p=1.0, max_new_tokens=8, seed=0))
# one file per process: two processes printing to one pipe can interleave their lines
Path(sys.argv[2], f"rank-{accelerator.process_index}").write_text(str(len(out[0][0].token_ids)))
