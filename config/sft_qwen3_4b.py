# SFT on the reference solutions, the OPSD paper's off-policy baseline, on Qwen3-4B as its authors run it.
# torchrun --nproc_per_node 8 pbsd.py config/sft_qwen3_4b.py
#   [scripts]  scripts/run_sft.sh and sft_train.py in this project's snapshot of github.com/siyan-zhao/OPSD
#              (590ec26, 2026-03-10), which run it through TRL's SFT trainer
#   [paper]    Zhao et al., arXiv:2601.18734
#   [project]  this project's choice, where nothing is published
model = "Qwen/Qwen3-4B"  # [scripts]
data = "siyanzhao/Openthoughts_math_30k_opsd"  # [scripts] (they hold out 1% of it)
eval_data = "HuggingFaceH4/aime_2024,yentinglin/aime_2025,MathArena/hmmt_feb_2025"  # [paper]
out_dir = "runs/sft_qwen3_4b"  # [project] checkpoints, metrics.jsonl, learning_curve.png
loss = "sft"  # the solution's tokens after the student prompt ([scripts]: after "Problem: ..." in their format)
batch_size = 64  # [scripts] 8 GPUs x 2 x accumulation 4
micro_batch_size = 2  # [scripts]
lora_rank = 64  # [scripts]
lora_alpha = 128  # [scripts]
lr = 2e-5  # [scripts]
warmup_steps = 0  # [scripts] none set
steps = 1850  # [scripts] 4 epochs: about 29,700 problems (their 99% of some 30,000), 64 a step
save_every = 100  # [scripts]
eval_every = 0  # [project] evaluate the checkpoints with eval.py
eval_k = 12  # [paper] Avg@12
eval_temperature = 1.0  # [scripts] eval/run_eval.sh
eval_thinking = True  # [scripts] eval/evaluate_math.py
eval_max_new_tokens = 38912  # [scripts] README, evaluation settings
