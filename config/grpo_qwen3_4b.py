# GRPO, the OPSD paper's reinforcement-learning baseline, on Qwen3-4B as its authors run it.
# torchrun --nproc_per_node 8 pbsd.py config/grpo_qwen3_4b.py
#   [scripts]  scripts/run_grpo.sh and grpo_train.py in this project's snapshot of github.com/siyan-zhao/OPSD
#              (590ec26, 2026-03-10), which run it through TRL's GRPO trainer
#   [paper]    Zhao et al., arXiv:2601.18734
#   [project]  this project's choice, where nothing is published
model = "Qwen/Qwen3-4B"  # [scripts]
data = "siyanzhao/Openthoughts_math_30k_opsd"  # [scripts] (they hold out 0.7% of it)
eval_data = "HuggingFaceH4/aime_2024,yentinglin/aime_2025,MathArena/hmmt_feb_2025"  # [paper]
out_dir = "runs/grpo_qwen3_4b"  # [project] checkpoints, metrics.jsonl, learning_curve.png
loss = "grpo"  # no KL term ([scripts] beta 0), advantages scaled by the group's std ([scripts] scale_rewards group)
n_student = 8  # [scripts] num_generations
batch_size = 8  # [project] prompts a step; theirs is 4 (32 completions: 8 GPUs x 1 x accumulation 4), which 8 ranks
#                 cannot split here
micro_batch_size = 1  # [project] 8 rollouts of up to 16,000 tokens a prompt
lora_rank = 64  # [scripts]
lora_alpha = 128  # [scripts]
temperature = 1.2  # [scripts]
max_new_tokens = 16000  # [scripts] max_completion_length
lr = 2e-5  # [scripts]
warmup_steps = 0  # [scripts] none set
steps = 7400  # [scripts] 2 epochs: about 29,800 problems (their 99.3% of some 30,000), 8 a step
save_every = 50  # [scripts]
eval_every = 0  # [project] evaluate the checkpoints with eval.py
eval_k = 12  # [paper] Avg@12
eval_temperature = 1.0  # [scripts] eval/run_eval.sh
eval_thinking = True  # [scripts] eval/evaluate_math.py
eval_max_new_tokens = 38912  # [scripts] README, evaluation settings
