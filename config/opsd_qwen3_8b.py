# OPSD on Qwen3-8B as its authors train it. torchrun --nproc_per_node 8 pbsd.py config/opsd_qwen3_8b.py
# Where each value comes from (the 1.7B script's, but for the model and the clip):
#   [scripts]  the authors' code, read in this project's snapshot of github.com/siyan-zhao/OPSD (590ec26, 2026-03-10)
#   [later]    their Qwen3-1.7B script after that snapshot, as quoted to this project; not readable here: not checked
#   [paper]    Zhao et al., arXiv:2601.18734
#   [project]  this project's choice, where nothing is published
model = "Qwen/Qwen3-8B"  # [paper] (the snapshot's scripts train 1.7B and 4B)
data = "siyanzhao/Openthoughts_math_30k_opsd"  # [scripts] opsd_train.py loads it
eval_data = "HuggingFaceH4/aime_2024,yentinglin/aime_2025,MathArena/hmmt_feb_2025"  # [paper] AIME 24, AIME 25, HMMT 25
out_dir = "runs/opsd_qwen3_8b"  # [project] checkpoints, metrics.jsonl, learning_curve.png
loss = "opsd"
beta_jsd = 0.0  # [later] forward KL (the snapshot: 0.5)
jsd_term_clip = 0.06  # [later] 0.06 for 8B: their jsd_token_clip, which clips each (token, entry) term
lora_rank = 64  # [scripts] and [paper], on all seven projections (the default lora_targets)
lora_alpha = 128  # [scripts]
temperature = 1.1  # [scripts]
top_p = 0.95  # [scripts]
top_k = 20  # [scripts]
max_new_tokens = 1024  # [later] (the snapshot and the first paper version: 2,048)
thinking = False  # [later] the student does not think (the first paper version: both think)
teacher_thinking = True  # [later]
lr = 5e-6  # [later] (the snapshot: 2e-4)
grad_clip = 0.1  # [later] their max grad norm (the snapshot: 1.0, the trainer's default)
warmup_steps = 0  # [scripts] none set, the trainer's default; their schedule decays linearly, this loop's cosine
batch_size = 32  # [scripts] 8 GPUs x 2 x accumulation 2 ([later] 4 GPUs x 4 x 2)
micro_batch_size = 4  # [project] the loop's default; BENCHMARKS.md's memory table says what a rank holds
steps = 100  # [later]
save_every = 25  # [later]
keep_last = 4  # [project] every checkpoint of the run, for eval.py
eval_every = 0  # [project] evaluate the checkpoints with eval.py: python eval.py config/opsd_qwen3_8b.py --lora ...
eval_k = 12  # [paper] Avg@12 (the snapshot's README: 16)
eval_temperature = 1.0  # [scripts] eval/run_eval.sh; no top-p, no top-k
eval_thinking = True  # [scripts] eval/evaluate_math.py thinks by default
eval_max_new_tokens = 38912  # [scripts] README, evaluation settings
