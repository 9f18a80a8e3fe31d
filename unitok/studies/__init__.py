"""Studies: the paper's ablations and its roadmap in miniature, with seeds (`unitok ablate`).

spec (Setting, Study, Scale, Task, run keys) -> roadmap (the roadmap study) -> plan (every study, the plan) ->
clip_pretrain (the `init` study's CLIP) -> train_task (one run) -> runner (a whole ablation, results.jsonl) ->
report (tables and matplotlib figures); metrics (what is compared) sits below them all.
"""
