"""Put this folder on PYTHONPATH (Python imports `sitecustomize` at start-up) to let accelerate run FSDP on CPU
processes (gloo), for every process a test launches: `-m prefopt STAGE`, `prefopt run`, any script.

accelerate enables FSDP only on GPU-like device types: on CPU processes an FSDP launch falls back to plain DDP
(MULTI_CPU), although torch's FSDP2 (`fully_shard`) runs on CPU over gloo. This makes that one switch: when
accelerate is given an FSDP plugin on CPU processes (ACCELERATE_USE_FSDP=true and the FSDP_* variables, which
`accelerate launch` sets from an FSDP config such as fsdp2_cpu.yaml here), the state says FSDP and keeps the
plugin. Everything after it (prepare, sharded forward/backward, clip_grad_norm_, save_state / load_state through
torch.distributed.checkpoint, get_state_dict) is accelerate's and torch's own FSDP2 code, as it runs on GPUs.
"""

import os

if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    _init = AcceleratorState.__init__

    def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = _init_with_fsdp_on_cpu
