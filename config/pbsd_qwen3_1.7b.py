# PBSD on Qwen3-1.7B. torchrun --nproc_per_node 8 pbsd.py config/pbsd_qwen3_1.7b.py
# The PBSD paper (Yu et al., arXiv:2605.05040) follows the OPSD protocol wherever it applies and publishes the model
# sizes, the LoRA and Avg@12, not its own optimisation settings; so this recipe takes OPSD's where it can.
#   [pbsd]     the PBSD paper
#   [opsd]     the OPSD recipe beside this one (config/opsd_qwen3_1.7b.py), whose lines say their own sources
#   [project]  this project's choice, where nothing is published
model = "Qwen/Qwen3-1.7B"  # [pbsd] one of its three sizes
data = "siyanzhao/Openthoughts_math_30k_opsd"  # [opsd]
eval_data = "HuggingFaceH4/aime_2024,yentinglin/aime_2025,MathArena/hmmt_feb_2025"  # [opsd]
out_dir = "runs/pbsd_qwen3_1.7b"  # [project] checkpoints, metrics.jsonl, learning_curve.png
loss = "pbsd"
pbsd_label = "teacher"  # [pbsd] its practical loss as close readings agree (README, the method); "reward" is ours
beta = 0.1  # [project] not published
n_teacher = 1  # [project] one pair a prompt
n_student = 1  # [opsd] one rollout a prompt
lora_rank = 64  # [pbsd] on all seven projections
lora_alpha = 128  # [pbsd]
temperature = 1.1  # [opsd]
top_p = 0.95  # [opsd]
top_k = 20  # [opsd]
max_new_tokens = 1024  # [opsd]
thinking = False  # [opsd]
teacher_thinking = True  # [opsd]
lr = 5e-6  # [opsd]
grad_clip = 0.1  # [opsd]
warmup_steps = 0  # [opsd]
batch_size = 32  # [opsd]
micro_batch_size = 4  # [project] the loop's default
steps = 100  # [opsd]
save_every = 25  # [opsd]
keep_last = 4  # [project]
eval_every = 0  # [project] evaluate the checkpoints with eval.py, as the OPSD recipe does
eval_k = 12  # [pbsd] Avg@12
eval_temperature = 1.0  # [opsd]
eval_thinking = True  # [opsd]
eval_max_new_tokens = 38912  # [opsd]
