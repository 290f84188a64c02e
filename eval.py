"""
Avg@k evaluation: k sampled answers per problem with the project's sampler, graded by the verifiable reward.

    python eval.py --model DIR [--lora DIR] --data SET [SET ...] [--k 12] [--temperature 1.0] [--max_new_tokens 2048]
    python eval.py config/opsd_qwen3_1.7b.py --lora runs/opsd/checkpoints/step_000100   # a recipe's evaluation
    torchrun --nproc_per_node 8 eval.py ...   (problems are split across ranks and gathered on rank 0)

A model, adapter or set may be a local path or a Hugging Face Hub name (Qwen/Qwen3-1.7B, HuggingFaceH4/aime_2024).

Avg@k is the mean over problems of (correct samples / k). pass@k uses the unbiased estimator of Chen et al. (2021),
1 - C(n - c, k) / C(n, k) with n samples of which c are correct. A problem samples with its own seed.

The training run's reporting and plumbing live here too (its per-step metrics, progress line, plot and table;
setup_distributed): pbsd.py imports this file for its evaluations, and both command lines share them.
"""

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import data
import model as qwen3

UNCERTAINTY_WORDS = ("wait", "hmm", "perhaps", "maybe", "actually", "alternatively", "let me check",
                     "let me verify", "double-check", "not sure")
UNCERTAINTY_PATTERN = re.compile(r"\b(" + "|".join(re.escape(w) for w in UNCERTAINTY_WORDS) + r")\b", re.I)


def uncertainty_count(texts):
    """Uncertainty words ("wait", "hmm", "perhaps", ...): the epistemic verbalization whose suppression goes with
    the reasoning losses of self-distillation (Kim et al., 2026); reported per 1K response tokens."""
    return sum(len(UNCERTAINTY_PATTERN.findall(t)) for t in texts)


def pass_at_k(n, c, k):
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


class Progress:
    """A one-line progress report with rate and ETA, rewritten in place on a terminal."""

    def __init__(self, total, label, enabled=True):
        self.total, self.label, self.enabled, self.start = total, label, enabled, time.time()

    def update(self, done, extra=""):
        if not self.enabled:
            return
        elapsed = time.time() - self.start
        eta = elapsed / done * (self.total - done) if done else float("nan")
        line = (f"[{self.label}] {done}/{self.total} {100 * done / self.total:3.0f}% | "
                f"{elapsed:5.0f}s elapsed, ETA {eta:4.0f}s{' | ' + extra if extra else ''}")
        end = "\r" if sys.stderr.isatty() and done < self.total else "\n"
        print(line, end=end, file=sys.stderr, flush=True)


@torch.no_grad()
def evaluate(model, tokenizer, examples, *, k=12, temperature=1.0, top_p=1.0, max_new_tokens=2048, batch_size=64,
             thinking=False, template=None, role="student", seed=None, compile=False, show_progress=True):
    """Samples k answers a problem and grades them: a summary with per-problem results. batch_size counts sampled
    rows; seed is one number (problem i takes its i-th child) or one a problem, so the results depend neither on
    batch_size nor on the ranks' split; compile as in generate. role "teacher" prompts with the reference solution
    (wrap the call in adapters_off for the frozen teacher)."""
    make_prompt = data.teacher_prompt if role == "teacher" else data.student_prompt
    problems_per_call = max(1, batch_size // k)
    progress = Progress(len(examples), f"eval {role}", show_progress)
    results, reward_sum = [], 0.0
    if isinstance(seed, int):
        seed = qwen3.child_seeds(seed, len(examples))
    for start in range(0, len(examples), problems_per_call):
        batch = examples[start:start + problems_per_call]
        prompts = [make_prompt(e, tokenizer, thinking, template) for e in batch]
        rollouts = qwen3.generate(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p,
                                  eos_ids=tokenizer.eos_ids, num_samples=k, compile=compile,
                                  seed=None if seed is None else seed[start:start + problems_per_call])
        for i, example in enumerate(batch):
            samples = rollouts[i * k:(i + 1) * k]
            texts = [tokenizer.decode(s.tokens) for s in samples]
            rewards = [data.reward(example, t) for t in texts]
            results.append({"problem": example.problem, "answer": example.answer, "responses": texts,
                            "rewards": rewards, "lengths": [len(s.tokens) for s in samples],
                            "truncated": [not s.finished for s in samples]})
            reward_sum += sum(rewards)
        progress.update(len(results), f"Avg@{k} so far {reward_sum / (k * len(results)):.3f}")
    return summarize(results, k)


def correct_counts(results):
    """Per problem, how many of its samples are correct: at full reward, for pass@k and the plot."""
    return [sum(r >= 1.0 for r in result["rewards"]) for result in results]


def summarize(results, k):
    correct = correct_counts(results)
    lengths = [n for result in results for n in result["lengths"]]
    texts = [t for result in results for t in result["responses"]]
    n = max(len(results), 1)
    return {
        "n_problems": len(results), "k": k,
        "avg_at_k": sum(sum(result["rewards"]) / k for result in results) / n,
        "pass_at_1": sum(pass_at_k(k, c, 1) for c in correct) / n,
        "pass_at_k": sum(pass_at_k(k, c, k) for c in correct) / n,
        "mean_length": sum(lengths) / max(len(lengths), 1),
        "truncation_rate": sum(t for result in results for t in result["truncated"]) / max(len(lengths), 1),
        "uncertainty_per_1k": 1000 * uncertainty_count(texts) / max(sum(lengths), 1),
        "per_problem": results,
    }


def setup_distributed():
    """(rank, world size, device); under torchrun one process per GPU with NCCL, or gloo on CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":  # before the process group, so that NCCL binds each rank to its own GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def evaluate_across_ranks(model, tokenizer, examples, **kwargs):
    """evaluate() with the problems split across the torch.distributed ranks (rank r takes r, r + world, ...);
    every rank returns the summary of all problems, in their original order."""
    if not (dist.is_available() and dist.is_initialized()):
        return evaluate(model, tokenizer, examples, **kwargs)
    rank, world = dist.get_rank(), dist.get_world_size()
    if isinstance(kwargs.get("seed"), int):  # each problem keeps the seed it has in a one-process run
        kwargs["seed"] = qwen3.child_seeds(kwargs["seed"], len(examples))[rank::world]
    kwargs["show_progress"] = kwargs.get("show_progress", True) and rank == 0
    mine = evaluate(model, tokenizer, examples[rank::world], **kwargs)
    gathered = [None] * world
    dist.all_gather_object(gathered, mine["per_problem"])
    ordered = [None] * len(examples)
    for r, part in enumerate(gathered):
        ordered[r::world] = part
    return summarize(ordered, mine["k"])


# the columns of eval.py's table: a summary's key, its heading (k filled in), its format
TABLE = {"n_problems": ("problems", "{:.0f}"), "avg_at_k": ("Avg@{k}", "{:.4f}"), "pass_at_1": ("pass@1", "{:.4f}"),
         "pass_at_k": ("pass@{k}", "{:.4f}"), "mean_length": ("mean length", "{:.1f}"),
         "truncation_rate": ("cut at the budget", "{:.3f}"), "uncertainty_per_1k": ("uncertainty / 1K", "{:.2f}")}


def print_table(summaries, k):
    """A row a summary: name -> summary (a set's, or the mean of several)."""
    rows = [[name, *[form.format(s[key]) for key, (_, form) in TABLE.items()]] for name, s in summaries.items()]
    header = ["set", *[heading.format(k=k) for heading, _ in TABLE.values()]]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths))))


def plot_summary(summary, png_path, max_new_tokens):
    """Draws an evaluation as png_path: how many problems got 0, 1, ..., k correct samples (Avg@k is the mean of that
    share, pass@k the problems off zero), and the response lengths of right and wrong samples against the budget, where
    a length collapse or a run of cut-off answers shows. Returns the problem counts per number correct."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    k, results = summary["k"], summary["per_problem"]
    correct = correct_counts(results)
    problems = [correct.count(c) for c in range(k + 1)]
    fig, (by_correct, by_length) = plt.subplots(1, 2, figsize=(11, 3.8))
    by_correct.bar(range(k + 1), problems, color="C0")
    by_correct.yaxis.set_major_locator(MaxNLocator(integer=True))
    by_correct.set(xlabel=f"correct samples of {k}", ylabel="problems", xticks=range(k + 1),
                   title=f"Avg@{k} {summary['avg_at_k']:.3f}, pass@{k} {summary['pass_at_k']:.3f} "
                         f"({summary['n_problems']} problems)")
    samples = [(n, r >= 1.0) for result in results for n, r in zip(result["lengths"], result["rewards"])]
    bins = range(0, max_new_tokens + 2, max(1, (max_new_tokens + 1) // 40))
    by_length.hist([[n for n, right in samples if right], [n for n, right in samples if not right]], bins=bins,
                   stacked=True, color=["C2", "C3"], label=["right", "wrong"])
    by_length.axvline(max_new_tokens, color="gray", ls="--",
                      label=f"budget ({100 * summary['truncation_rate']:.0f}% cut at it)")
    by_length.set(xlabel="response tokens", ylabel="samples",
                  title=f"response lengths (mean {summary['mean_length']:.0f})")
    by_length.legend(fontsize=8)
    fig.tight_layout()
    qwen3.atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return problems


# The run's plot: held-out accuracy, then every per-step diagnostic the loop logs that this run has (PBSD's
# margins, OPSD's KL estimate, ...), each as its raw values and a 10-step running mean.
CURVES = (("training rewards", "mean", (("student_reward", "student rollouts"), ("teacher_reward", "teacher rollouts"),
                                        ("label", "PBSD label z"),
                                        ("margin_below_target", "PBSD pairs below their label's margin"))),
          ("loss", "loss", (("loss", "loss"),)),
          ("PBSD margin", "m = beta (s(y+) - s(y-)), mean", (("margin", "margin"),)),
          ("student tokens", "nats per token", (("student_entropy", "entropy"),
                                               ("kl_estimate", "KL(student || teacher) estimate"))),
          ("response lengths", "tokens", (("student_length", "student"), ("teacher_length", "teacher"),
                                          ("response_length", "reference (SFT)"))),
          ("cut at max_new_tokens", "share of rollouts", (("student_truncated", "student"),
                                                          ("teacher_truncated", "teacher"))),
          ("uncertainty words", "per 1K student tokens", (("uncertainty_per_1k", "wait, hmm, perhaps, ..."),)),
          ("step time", "seconds", (("generation_seconds", "generation"), ("train_seconds", "training"))),
          ("GPU memory", "GB, the step's peak on the fullest rank", (("peak_memory_gb", "allocated"),)))


def plot_run(metrics_path, png_path):
    """Draws metrics.jsonl as png_path: a panel per curve with values, held-out accuracy first. Returns the titles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(metrics_path)] if os.path.exists(metrics_path) else []
    evals, train = [r for r in rows if "eval_avg_at_k" in r], [r for r in rows if "loss" in r]
    curves = [(title, ylabel, [(key, label) for key, label in lines if any(key in r for r in train)])
              for title, ylabel, lines in CURVES]
    curves = [curve for curve in curves if curve[2]]
    titles = ["held-out accuracy"] * bool(evals) + [title for title, _, _ in curves]
    if not titles:
        return titles
    n_columns = min(len(titles), 3)
    n_lines = math.ceil(len(titles) / n_columns)
    fig, axes = plt.subplots(n_lines, n_columns, figsize=(5 * n_columns, 3.6 * n_lines), squeeze=False)
    panels = iter(axes.flat)
    if evals:
        ax = next(panels)
        ax.plot([r["step"] for r in evals], [r["eval_avg_at_k"] for r in evals], "o-", label="student, Avg@k")
        ax.plot([r["step"] for r in evals], [r["eval_greedy_accuracy"] for r in evals], "s--", label="student, greedy")
        for r in (r for r in evals if "teacher_avg_at_k" in r):  # the frozen teacher, evaluated once
            ax.axhline(r["teacher_avg_at_k"], color="gray", ls="--", label="frozen teacher (with solution), Avg@k")
        for r in (r for r in rows if "target_accuracy" in r):  # a toy world's, exact
            ax.axhline(r["target_accuracy"], color="gray", ls=":",
                       label=f"reward-reweighted teacher (beta {r['beta']})")
        ax.set(xlabel="step", ylabel=f"accuracy (k = {evals[0]['eval_k']})", title="held-out accuracy", ylim=(0, 1.02))
        ax.legend(fontsize=8)
    for (title, ylabel, lines), ax in zip(curves, panels):
        for color, (key, label) in enumerate(lines):
            points = [(r["step"], r[key]) for r in train if key in r]
            steps, values = zip(*points)
            mean = [sum(values[max(0, i - 9):i + 1]) / len(values[max(0, i - 9):i + 1]) for i in range(len(values))]
            ax.plot(steps, values, color=f"C{color}", alpha=0.25, lw=0.8)
            ax.plot(steps, mean, color=f"C{color}", label=label)
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.legend(fontsize=8)
    for ax in panels:  # the grid's empty cells
        ax.axis("off")
    fig.tight_layout()
    qwen3.atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return titles


def print_run_table(trainer, seconds, toy_world="", target=None):
    """The run's first and last held-out evaluations side by side, with the frozen teacher's, and in a toy world the
    reward-reweighted teacher's accuracy (target, as logged)."""
    config, history = trainer.config, trainer.history
    before, after = history[0], history[-1]
    k = config.eval_k
    rows = [(f"student Avg@{k}", before["eval_avg_at_k"], after["eval_avg_at_k"]),
            (f"student pass@{k}", before["eval_pass_at_k"], after["eval_pass_at_k"]),
            ("student greedy accuracy", before["eval_greedy_accuracy"], after["eval_greedy_accuracy"]),
            ("response length (tokens)", before["eval_mean_length"], after["eval_mean_length"]),
            ("uncertainty words / 1K tokens", before["eval_uncertainty_per_1k"], after["eval_uncertainty_per_1k"])]
    objective = {"pbsd": f"PBSD (label {config.pbsd_label}, beta {config.beta})", "opsd": f"OPSD (beta_jsd "
                 f"{config.beta_jsd})", "opsd_sampled": "OPSD-sampled", "sft": "SFT",
                 "grpo": f"GRPO ({config.n_student} rollouts a group)"}[config.loss]
    objective += f" in the {toy_world} toy world" if toy_world else ""
    print(f"\n{objective} on {before['eval_n_problems']} held-out problems, {config.steps} steps, {seconds:.0f} s")
    print(f"{'':<32}{'before':>10}{'after':>10}")
    for name, value_before, value_after in rows:
        print(f"{name:<32}{value_before:>10.3f}{value_after:>10.3f}")
    frozen = [(f"frozen teacher Avg@{k}", before.get("teacher_avg_at_k")),
              ("frozen teacher greedy accuracy", before.get("teacher_greedy_accuracy")),
              (f"reward-reweighted teacher pi*", target and target["target_accuracy"])]
    for name, value in frozen:
        if value is not None:
            print(f"{name:<32}{value:>10.3f}")
    print(f"learning curve: {os.path.join(config.out_dir, 'learning_curve.png')}")


def start_run_log(out_dir, step, config):
    """A run starting at step 0 moves an earlier run's files in out_dir to a new out_dir/earlier_runs/<time>-<random>/:
    runs never mix, --resume never picks up another run, nothing is deleted. A run resumed at a step keeps the log
    lines up to it (it runs the later ones again) and drops a line cut short by a kill. Writes config.json."""
    metrics = os.path.join(out_dir, "metrics.jsonl")
    earlier = [n for n in ("metrics.jsonl", "learning_curve.png", "config.json", "checkpoints")
               if step == 0 and os.path.exists(os.path.join(out_dir, n))]
    if step > 0 and os.path.exists(metrics):
        kept = []
        for number, line in enumerate(open(metrics).read().splitlines(), start=1):
            try:
                kept += [line + "\n"] if json.loads(line)["step"] <= step else []
            except json.JSONDecodeError:  # a run killed while appending leaves its last line cut short
                print(f"[resume] {metrics}: dropped line {number}, cut short: {line[:60]!r}", file=sys.stderr)
        qwen3.atomic_write(metrics, lambda tmp: Path(tmp).write_text("".join(kept)))
    elif earlier:
        os.makedirs(os.path.join(out_dir, "earlier_runs"), exist_ok=True)
        archive = tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=f"{out_dir}/earlier_runs")
        for name in earlier:
            os.replace(os.path.join(out_dir, name), os.path.join(archive, name))
        print(f"[pbsd] {out_dir} held an earlier run; moved its {', '.join(earlier)} to {archive} "
              f"(--resume continues a run instead)", file=sys.stderr)
    os.makedirs(out_dir, exist_ok=True)
    qwen3.atomic_write(os.path.join(out_dir, "config.json"),
                       lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


class Stats:
    """Sums and counts per metric for one step, reduced over ranks in one collective."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, name, values):
        self.add_ratio(name, float(sum(values)), len(values))

    def add_ratio(self, name, total, count):
        self.sums[name] = self.sums.get(name, 0.0) + total
        self.counts[name] = self.counts.get(name, 0) + count

    def reduce(self, world, device):
        names = sorted(self.sums)
        totals = torch.tensor([[self.sums[n], self.counts[n]] for n in names], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(totals)
        per_step = ("generation_seconds", "train_seconds", "rollout_tokens")  # totals over the step, mean over ranks
        return {n: (s / world if n in per_step else s / max(c, 1e-9)) for n, (s, c) in zip(names, totals.tolist())}


def summary_line(m):
    """The step's progress line: its loss and what the step logged of rewards, margin, lengths, time and memory."""
    shown = [("loss", "loss {:.4f}"), ("student_reward", "r_student {:.2f}"), ("teacher_reward", "r_teacher {:.2f}"),
             ("margin", "margin {:+.2f}"), ("student_length", "len {:.0f}"), ("generation_seconds", "gen {:.1f}s"),
             ("train_seconds", "train {:.1f}s"), ("peak_memory_gb", "mem {:.1f}GB")]
    return " ".join(form.format(m[key]) for key, form in shown if key in m)


def set_name(spec):  # a set's row and folder: a Hub name's last part, a file's stem, a folder's (a glob's) name
    return re.sub(r"[^\w-]+", "_", Path(spec.split("*")[0].rstrip("/")).stem) or "data"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", help="a recipe (config/*.py): its model, held-out sets and evaluation "
                        "settings are the defaults, which the flags override")
    parser.add_argument("--model", help="HF Qwen3 checkpoint: a folder or a Hub name")
    parser.add_argument("--lora", help="PEFT adapter to apply: a folder (a training checkpoint) or a Hub name")
    parser.add_argument("--data", nargs="+", help="held-out sets, a table row each: JSONL, JSON or Parquet files, "
                        "folders of them, globs or Hub data sets")
    parser.add_argument("--task", choices=("math", "tool"), default="math")
    for field in ("problem", "answer", "solution"):
        parser.add_argument(f"--{field}_key", default="", help=f"the {field} column (default: the first present of "
                            f"{', '.join(data.FIELD_NAMES[field])})")
    parser.add_argument("--k", type=int, default=12)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=96, help="sampled rows per sampler call")
    parser.add_argument("--thinking", action="store_true")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the weights' dtype (pbsd.py's toy world trains in float32)")
    parser.add_argument("--template", help="student prompt template with {problem} (default: the task's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eager", action="store_true",
                        help="sample without torch.compile and CUDA graphs (a GPU uses them otherwise)")
    parser.add_argument("--out", default="eval_out", help="a folder a set for samples.jsonl, summary.json and "
                        "summary.png, and summary.json of them all")
    args = parser.parse_args(argv)
    if args.recipe:
        import pbsd  # not at the top: pbsd.py imports this file
        try:
            config = pbsd.parse_args([args.recipe])
        except pbsd.ConfigError as e:
            parser.error(str(e))
        parser.set_defaults(model=config.model, data=[s for s in config.eval_data.split(",") if s], task=config.task,
                            k=config.eval_k, temperature=config.eval_temperature, thinking=config.eval_thinking,
                            max_new_tokens=config.eval_max_new_tokens or config.max_new_tokens)
        args = parser.parse_args(argv)
    if not (args.model and args.data):
        parser.error("--model and --data are needed, or a recipe that names them")
    for name in ("k", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.temperature < 0:
        parser.error(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top_p must lie in (0, 1], got {args.top_p}")

    rank, _, device = setup_distributed()
    model_path = data.local_path(args.model, "model")
    model = qwen3.load_qwen3(model_path, device=device, dtype=getattr(torch, args.dtype))
    if args.lora:
        qwen3.load_lora(model, data.local_path(args.lora, "adapter"))
    tokenizer = data.Tokenizer(model_path)
    summaries, names = {}, [set_name(spec) for spec in args.data]
    if len(set(names)) < len(names):  # two sets of one name: numbered
        names = [f"{number}_{name}" for number, name in enumerate(names, start=1)]
    for spec, name in zip(args.data, names):
        path = data.local_path(spec, "dataset")
        examples = (data.load_examples(path, args.problem_key, args.solution_key, args.answer_key)
                    if args.task == "math" else data.load_tool_examples(path))
        summary = evaluate_across_ranks(model, tokenizer, examples, k=args.k, temperature=args.temperature,
                                        top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                        batch_size=args.batch_size, thinking=args.thinking, template=args.template,
                                        seed=args.seed, compile=device.type == "cuda" and not args.eager)
        if rank == 0:
            write_evaluation(summary, os.path.join(args.out, name), args.max_new_tokens)
        summaries[name] = {key: value for key, value in summary.items() if key != "per_problem"}
    if rank == 0:  # each set counts once in the mean, whatever its size
        mean = {key: statistics.mean(s[key] for s in summaries.values()) for key in TABLE}
        json.dump({"sets": summaries, "mean_of_sets": mean}, open(os.path.join(args.out, "summary.json"), "w"),
                  indent=2)
        print_table({**summaries, **({f"mean of {len(summaries)} sets": mean} if len(summaries) > 1 else {})}, args.k)
        print(f"each set's samples.jsonl, summary.json and summary.png in {args.out}/<set>/, all sets' summary in "
              f"{args.out}/summary.json")
    if dist.is_initialized():
        dist.barrier()  # the ranks leave together: one tearing gloo down while another still writes can abort it
        dist.destroy_process_group()


def write_evaluation(summary, folder, max_new_tokens):
    """A set's samples (a line each), its summary and its plot, in folder."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "samples.jsonl"), "w") as f:
        for index, result in enumerate(summary["per_problem"]):
            for sample, text in enumerate(result["responses"]):
                f.write(json.dumps({"problem_index": index, "sample": sample, "answer": result["answer"],
                                    "response": text, "reward": result["rewards"][sample],
                                    "length": result["lengths"][sample],
                                    "truncated": result["truncated"][sample]}) + "\n")
    json.dump({key: value for key, value in summary.items() if key != "per_problem"},
              open(os.path.join(folder, "summary.json"), "w"), indent=2)
    plot_summary(summary, os.path.join(folder, "summary.png"), max_new_tokens)


if __name__ == "__main__":
    try:
        main()
    except (qwen3.CheckpointError, data.DataError) as e:
        sys.exit(f"error: {e}")
