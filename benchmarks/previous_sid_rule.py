"""autoprog's CLI with AutoProg-Zero's searches seeing the previous stage's stage identifier: the rule before
2026-12-08 (stage k's candidates were scored with stage k-1's SID, stage 1's with the last one's), for measuring
it against today's (the official code's: stage k's). The SID is set after the search instead of before it.

    python benchmarks/previous_sid_rule.py finetune --method autoprog-zero --seed 0 --time-source flops --out OUT
"""

from __future__ import annotations

import sys

import autoprog.diffusion.trainer as trainer

trainer.DiffusionTrainer._stage_entered = trainer.DiffusionTrainer._stage_entering  # the SID set after the search
trainer.DiffusionTrainer._stage_entering = lambda self, k: None

if __name__ == "__main__":
    from autoprog.cli import main

    sys.exit(main(sys.argv[1:]))
