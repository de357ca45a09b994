#!/usr/bin/env bash
# The separate environment benchmarks/ddpo.py runs in: TRL 0.23.1, the last release with DDPOTrainer (removed in 0.24),
# on the same torch / diffusers / transformers / peft / accelerate as trl_nft. Never a trl_nft dependency: trl_nft
# itself needs trl 1.16, so the two cannot share an environment.
#
#     bash benchmarks/ddpo_env.sh                 # creates .venv-ddpo at the repository root (git-ignored)
#     bash benchmarks/ddpo_env.sh /path/to/venv   # elsewhere; PYTHON=python3.11 picks the interpreter (>= 3.11)
#
# About a minute with the package index reachable. Pins, and why:
#   torch==2.13.0         installed first and alone: the CPU wheel on this machine's disk; an unpinned torch pulled in
#                         by another package would download a multi-GB CUDA build. A constraint keeps it afterwards.
#   trl==0.23.1           DDPOTrainer, DDPOConfig, DefaultDDPOStableDiffusionPipeline (imports and trains as shipped).
#   transformers==5.24.0  trl 0.23.1 asks for >= 4.56.1; the shipped UNet base's tokenizer is saved as
#                         `TokenizersBackend`, a transformers 5 class, so 4.x cannot load the base at all. 5.24.0 is
#                         trl_nft's floor, and DDPO runs on it unchanged.
#   diffusers==0.42.1     trl_nft's floor; the shipped base was saved by it. DDPO's pipeline code (StableDiffusionPipeline,
#                         DDIMScheduler, `_encode_prompt`) still runs on it (one FutureWarning, filtered by ddpo.py).
#   peft==0.21.2, accelerate==1.16.0, datasets==5.2.0
#                         trl_nft's tested versions: DDPO's LoRA (unet.add_adapter, get_peft_model_state_dict), its
#                         Accelerator (gradient accumulation, a tracker instance as log_with) and the shapes dataset.
#   numpy, scipy, pyyaml, pillow
#                         the shapes world's judge and the demo's prompt mix (trl_nft[shapes] without matplotlib).
# trl_nft is installed editable without dependencies (`--no-deps -e .`): only the shapes world is used there
# (trl_nft.shapes, .evaluate, .judge, .world, .demo.parse_tag_weights, .pretrain), none of which imports trl.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-ddpo}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "ddpo_env.sh: Python >= 3.11 needed (trl_nft's floor); set PYTHON=..." >&2
    exit 1
}
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

"${PIP[@]}" torch==2.13.0
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==2.13.0" >"$CONSTRAINTS"
"${PIP[@]}" -c "$CONSTRAINTS" \
    trl==0.23.1 \
    transformers==5.24.0 \
    diffusers==0.42.1 \
    peft==0.21.2 \
    accelerate==1.16.0 \
    datasets==5.2.0 \
    "numpy>=2.4" "scipy>=1.17" "pyyaml>=6.0" "pillow>=13.0" "safetensors>=0.8" "tokenizers>=0.23"
"${PIP[@]}" -c "$CONSTRAINTS" --no-deps -e "$ROOT"

# Fails here, not an hour into a benchmark, if any of it does not import.
HF_HUB_OFFLINE=1 "$VENV/bin/python" - <<'EOF'
import warnings

warnings.simplefilter("ignore")
import torch
import trl
from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline  # noqa: F401

import trl_nft.shapes
import trl_nft.shapes.evaluate
import trl_nft.shapes.judge
import trl_nft.shapes.world
from trl_nft.shapes.demo import parse_tag_weights  # noqa: F401
from trl_nft.shapes.pretrain import load_base_pipeline  # noqa: F401

assert trl.__version__ == "0.23.1", trl.__version__
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"DDPO environment ready: torch {torch.__version__}, trl {trl.__version__}")
EOF
echo "Run: $VENV/bin/python $ROOT/benchmarks/ddpo.py --help"
