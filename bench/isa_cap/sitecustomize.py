"""vLLM held below its CPU's instruction set, for `bench/peers.py run --isa LEVEL` (which puts this folder
on vLLM's PYTHONPATH and sets PEERS_CPU_ISA=LEVEL).

vLLM's CPU platform asks torch what the CPU has (torch.cpu._is_avx512_supported and its siblings) to pick
one of its three kernel builds (_C for AVX-512 + BF16, _C_AVX512, _C_AVX2), its attention's ISA and its
matmul dispatch (AMX or oneDNN). torch answers from the CPU itself, whatever ATEN_CPU_CAPABILITY says, so
the answers above LEVEL are made "no" here, as a CPU without them gives them: at avx2 every AVX-512 and
AMX one, at avx512_bf16 (a Zen 4 or 5) the AMX ones. ONEDNN_MAX_CPU_ISA (set beside this) holds oneDNN's
own dispatch, inside vLLM's kernels and torch's, to the same level.
"""

import os

import torch.cpu

_HIDDEN = {"avx2": ("_is_avx512", "_is_amx"), "avx512_bf16": ("_is_amx",)}.get(os.environ.get("PEERS_CPU_ISA", ""), ())

for _name in dir(torch.cpu):
    if _HIDDEN and _name.startswith(_HIDDEN):
        setattr(torch.cpu, _name, lambda: False)
