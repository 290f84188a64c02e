"""
Everything between a data file and a reward: examples, the tokenizer, the student and teacher prompts,
the verifiable rewards (math answers, tool calls), and the built-in synthetic math task.
"""

import glob
import json
import os
import random
import re
import sys
from dataclasses import dataclass, replace

from tokenizers import Tokenizer as HFTokenizer


class DataError(ValueError):
    """A data file or template that cannot be used; the message names the file and the row."""


@dataclass
class Example:
    problem: str
    answer: str  # the final answer a response must reach (math), or the reference call as JSON (tool)
    solution: str = ""  # the reference solution the teacher reads; absent in most evaluation sets
    task: str = "math"  # "math" or "tool": which reward grades it


def last_boxed(text):
    """The content of the last \\boxed{...} (or \\fbox{...}) in text, nested braces included; None if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1:i]
    return None  # unbalanced: the box was cut off


# Data files: JSONL, JSON (a list of objects) and Parquet, the formats the published sets ship in; a data set is a
# file, a folder (as a download leaves it, the shards perhaps in a data/ folder inside) or a glob.
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
# the names the published sets give each field, in the order they are tried where no key is given
FIELD_NAMES = {"problem": ("problem", "question", "Problem", "Question"),
               "answer": ("answer", "Answer", "final_answer"), "solution": ("solution", "Solution")}


# Hub names: a local path wins; otherwise owner/name is looked up on the Hugging Face Hub and kept in its cache
# ($HF_HOME; HF_HUB_OFFLINE=1 reads the cache alone), with only the files a run reads downloaded.
HUB_FILES = {"model": ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                       "model.safetensors", "model-*.safetensors", "model.safetensors.index.json"],
             "adapter": ["adapter_config.json", "adapter_model.safetensors"],
             "dataset": ["*.parquet", "*.jsonl", "*.json"]}


def local_path(spec, kind):
    """spec as it is if it is a local path (or a glob, or not of the form owner/name); else the folder that holds the
    Hub's model, adapter or dataset of that name. An unknown name is a DataError that names it."""
    if os.path.exists(spec) or glob.has_magic(spec) or not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        return spec
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(spec, repo_type="dataset" if kind == "dataset" else "model",
                                 allow_patterns=HUB_FILES[kind])
    except Exception as e:  # not on the Hub, not in the cache offline, no network, no access: each says why
        reason = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise DataError(f"{spec}: neither a local path nor a Hub {kind} that could be fetched ({reason})") from None


def data_files(spec):
    """A file, a folder (its data files and those of a data/ folder inside it, in name order) or a glob -> paths."""
    if os.path.isdir(spec):
        files = sorted(path for folder in (spec, os.path.join(spec, "data")) if os.path.isdir(folder)
                       for path in glob.glob(os.path.join(folder, "*")) if path.endswith(DATA_SUFFIXES))
    elif glob.has_magic(spec):
        files = sorted(glob.glob(spec))
    elif os.path.exists(spec):
        files = [spec]
    else:
        raise DataError(f"{spec}: data file does not exist")
    if not files:
        raise DataError(f"{spec}: no {', '.join(DATA_SUFFIXES)} files there")
    return files


def _read_rows(spec):
    """Yields (file, row number, dict) from every file of a data set; row numbers are 1-based, per file."""
    for path in data_files(spec):
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq
            yield from ((path, number, row) for number, row in enumerate(pq.read_table(path).to_pylist(), start=1))
        elif path.endswith(".json"):
            try:
                rows = json.load(open(path))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
            yield from ((path, number, row) for number, row in enumerate(rows, start=1))
        else:
            for number, line in enumerate(open(path), start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: invalid JSON at line {number}: {e.msg}") from None
                    yield path, number, row


def as_answer(value):
    """An answer as text: the integers AIME and AMC store as numbers (23, 23.0) become '23'."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return None if value is None or value == "" else str(value)


def load_examples(spec, problem_key="", solution_key="", answer_key=""):
    """Math examples from a data set (data_files). A key given wins; else each field takes the first of its FIELD_NAMES
    that the data has, and the columns used are printed once. A row without an answer takes the last \\boxed{} of its
    solution; a set without a solution column leaves it empty (evaluation needs none)."""
    rows = list(_read_rows(spec))
    for path, number, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {number} is not an object")
    columns = dict.fromkeys(key for _, _, row in rows for key in row)  # every row's, in order of appearance
    given = {"problem": problem_key, "solution": solution_key, "answer": answer_key}
    chosen = {field: given[field] or next((name for name in names if name in columns), None)
              for field, names in FIELD_NAMES.items()}
    if rows and chosen["problem"] not in columns:
        raise DataError(f"{rows[0][0]}: no problem column (tried {problem_key or ', '.join(FIELD_NAMES['problem'])}); "
                        f"its columns are {', '.join(map(str, columns))}")
    if rows and os.environ.get("RANK", "0") == "0":  # said once, not once a torchrun rank
        print(f"[data] {spec}: " + ", ".join(f"{field} <- {name!r}" for field, name in chosen.items()),
              file=sys.stderr)
    examples = []
    for path, number, row in rows:
        if not row.get(chosen["problem"]):
            raise DataError(f"{path}: row {number} has no {chosen['problem']!r} field")
        solution = str(row.get(chosen["solution"]) or "")
        answer = as_answer(row.get(chosen["answer"])) or last_boxed(solution)
        if answer is None:
            tried = chosen["answer"] or ", ".join(FIELD_NAMES["answer"])
            raise DataError(f"{path}: row {number} has no answer ({tried}) and no \\boxed{{}} answer in its solution")
        examples.append(Example(str(row[chosen["problem"]]), answer, solution))
    if not examples:
        raise DataError(f"{spec}: no examples in the data")
    return examples


def write_examples(path, examples):
    """Math examples as the JSONL that load_examples reads back."""
    with open(path, "w") as f:
        f.writelines(json.dumps({"problem": e.problem, "solution": e.solution, "answer": e.answer}) + "\n"
                     for e in examples)


# Tool use, in the ToolAlpaca style: a request plus API documentation; the answer is one call,
#   Action: <name>
#   Action Input: <JSON arguments>


def format_tool_call(name, arguments):
    return f"Action: {name}\nAction Input: {json.dumps(arguments, sort_keys=True)}"


def parse_tool_call(text):
    """The last Action / Action Input pair in text -> (name, arguments dict), or None."""
    matches = re.findall(r"Action:\s*([^\n]+)\s*\nAction Input:\s*(\{.*?\})\s*(?=\n|$|<)", text, flags=re.S)
    for name, arguments in reversed(matches):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            continue
        if isinstance(parsed, dict):
            return name.strip(), parsed
    return None


def load_tool_examples(path, request_key="instruction", docs_key="documentation", action_key="action",
                       arguments_key="action_input"):
    """ToolAlpaca-style rows: the request, the API documentation, the reference action and its JSON arguments."""
    examples = []
    for file, row_number, row in _read_rows(path):
        for key in (request_key, docs_key, action_key):
            if not isinstance(row, dict) or not row.get(key):
                raise DataError(f"{file}: row {row_number} has no {key!r} field")
        arguments = row.get(arguments_key, {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}: row {row_number}: {arguments_key!r} is not JSON ({e.msg})") from None
        call = format_tool_call(row[action_key], arguments)
        problem = f"{row[request_key]}\n\nAvailable APIs:\n{row[docs_key]}"
        examples.append(Example(problem, json.dumps({"name": row[action_key], "arguments": arguments}),
                                call, task="tool"))
    if not examples:
        raise DataError(f"{path}: no examples in the file")
    return examples


# Rewards in [0, 1], verifiable.


def math_reward(response_text, answer, timeout_seconds=5):
    """1 if the last \\boxed{} of the response equals the answer (math-verify, bounded time), else 0."""
    from math_verify import parse, verify
    boxed = last_boxed(response_text)
    if boxed is None or not boxed.strip():
        return 0.0
    try:
        gold = parse(f"${answer}$", parsing_timeout=timeout_seconds)
        predicted = parse(f"${boxed}$", parsing_timeout=timeout_seconds)
        return float(bool(gold) and bool(predicted) and verify(gold, predicted, timeout_seconds=timeout_seconds))
    except Exception:  # math-verify's own parse failures and time-outs grade as wrong, never crash a run
        return 0.0


def tool_reward(response_text, reference):
    """1 if the response's call has the reference's action name and the same arguments as parsed JSON."""
    reference = json.loads(reference)
    call = parse_tool_call(response_text)
    return float(call is not None and call[0] == reference["name"] and call[1] == reference["arguments"])


def reward(example, response_text):
    return (math_reward if example.task == "math" else tool_reward)(response_text, example.answer)


# The tokenizer: the `tokenizers` library reading the checkpoint's tokenizer.json.

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


class Tokenizer:
    def __init__(self, checkpoint_dir):
        path = os.path.join(checkpoint_dir, "tokenizer.json")
        if not os.path.exists(path):
            raise DataError(f"{path}: no tokenizer.json in the checkpoint folder")
        self.tokenizer = HFTokenizer.from_file(path)
        for token in (IM_START, IM_END):
            if self.tokenizer.token_to_id(token) is None:
                raise DataError(f"{path}: the chat token {token} is not in the vocabulary")
        self.eos_ids = self._eos_ids(checkpoint_dir)
        self.pad_id = self.tokenizer.token_to_id(ENDOFTEXT) or self.eos_ids[0]

    def _eos_ids(self, checkpoint_dir):
        path = os.path.join(checkpoint_dir, "generation_config.json")
        if os.path.exists(path):
            eos = json.load(open(path)).get("eos_token_id")
            if eos is not None:
                return tuple(eos) if isinstance(eos, list) else (eos,)
        return tuple(i for i in (self.tokenizer.token_to_id(IM_END), self.tokenizer.token_to_id(ENDOFTEXT))
                     if i is not None)

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        """Text without the special tokens (the EOS that ends a response)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)


# Prompts, in Qwen3's chat format. Student and teacher share the thinking setting: with thinking off Qwen3
# opens the answer with an empty think block, and a mismatch would make them disagree from the first token.

TEMPLATES = {
    "math": {
        "student": "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
        "teacher": ("{problem}\n\nHere is a reference solution to this problem:\n"
                    "=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n\n"
                    "Make sure you understand the reference solution, then solve the problem in your own words, "
                    "without referring to the reference.\n"
                    "Please reason step by step, and put your final answer within \\boxed{}."),
    },
    "tool": {
        "student": ("{problem}\n\nAnswer with exactly one API call, as\n"
                    "Action: <API name>\nAction Input: <JSON arguments>"),
        "teacher": ("{problem}\n\nHere is a reference answer:\n"
                    "=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n\n"
                    "Make sure you understand the reference answer, then answer in your own words.\n"
                    "Answer with exactly one API call, as\nAction: <API name>\nAction Input: <JSON arguments>"),
    },
}


def check_template(template, role):
    needed = ("{problem}", "{solution}") if role == "teacher" else ("{problem}",)
    for field in needed:
        if field not in template:
            raise DataError(f"the {role} template must contain {field}: {template!r}")
    return template


def chat_prompt(user_text, thinking=False):
    prompt = f"{IM_START}user\n{user_text}{IM_END}\n{IM_START}assistant\n"
    return prompt if thinking else prompt + "<think>\n\n</think>\n\n"


def student_prompt(example, tokenizer=None, thinking=False, template=None):
    """The problem alone. Returns token ids when given a tokenizer, else the text."""
    template = check_template(template or TEMPLATES[example.task]["student"], "student")
    text = chat_prompt(template.replace("{problem}", example.problem), thinking)
    return tokenizer.encode(text) if tokenizer else text


def teacher_prompt(example, tokenizer=None, thinking=False, template=None):
    """The problem and the reference solution."""
    if not example.solution:
        raise DataError(f"the teacher prompt needs a reference solution; this example has none: "
                        f"{example.problem[:80]!r}")
    template = check_template(template or TEMPLATES[example.task]["teacher"], "teacher")
    text = chat_prompt(template.replace("{problem}", example.problem).replace("{solution}", example.solution),
                       thinking)
    return tokenizer.encode(text) if tokenizer else text


# The built-in synthetic task, deterministic for a seed: the toy world and the tests train and grade on it.

NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Ivy", "Jon", "Kim", "Leo", "Mia"]
ITEMS = ["apples", "books", "coins", "pens", "shells", "stamps", "marbles", "cards"]


def synthetic_math(n, seed=0, steps=(1, 2), max_value=99):
    """n word problems of `steps` additions or subtractions on numbers up to max_value, each with a worked solution that
    does one operation per line and ends in \\boxed{answer}."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        value = rng.randint(1, max_value)
        sentences, lines = [f"{name} has {value} {item}."], []
        for _ in range(rng.randint(*steps)):
            if rng.random() < 0.5 or value < 2:
                amount = rng.randint(1, max_value)
                sentences.append(f"{name} gets {amount} more.")
                lines.append(f"{value} + {amount} = {value + amount}")
                value += amount
            else:
                amount = rng.randint(1, value - 1)
                sentences.append(f"{name} gives away {amount}.")
                lines.append(f"{value} - {amount} = {value - amount}")
                value -= amount
        problem = " ".join(sentences) + f" How many {item} does {name} have now?"
        solution = "\n".join(lines) + f"\n\\boxed{{{value}}}"
        examples.append(Example(problem, str(value), solution))
    return examples


# The toy worlds of pbsd.py: what the teacher reads, and which answers its warm start teaches it to give.
DECOYS = (-20, -10, -3, -2, -1, 1, 2, 3, 10, 20)


def toy_examples(world, n, seed, **task):
    """n problems of synthetic_math(**task), each with its world's reference and the answers the teacher is taught.
    worked: the worked solution, whose result the teacher copies: it is right on nearly every problem. candidates:
    "The result is a or b.", the answer and a decoy drawn for the row, in random order, either of which it learns to
    give: right about half the time on every problem, below the reward-reweighted target pi_T exp(r / beta) / Z (at
    beta 0.5, pi*(right) = 0.88). mistakes: the same, with the problem's own decoy (its operation chooses it): the
    target then depends on the problem alone, which a student that never reads the reference can follow."""
    rng, examples = random.Random(seed), []
    for example in synthetic_math(n, seed=seed, **task):
        taught = [example.answer]
        if world in ("candidates", "mistakes"):
            answer = int(example.answer)
            chooser = random.Random(example.solution.splitlines()[0]) if world == "mistakes" else rng  # "7 + 5 = 12"
            decoy = answer + chooser.choice([d for d in DECOYS if answer + d >= 0])
            taught = rng.sample([example.answer, str(decoy)], 2)
            example = replace(example, solution=f"The result is {taught[0]} or {taught[1]}.")
        examples.append((example, taught))
    return examples


def train_tokenizer(texts, vocab_size, path):
    """Trains a byte-level BPE on texts (digits split one per token, as in Qwen's tokenizer), adds the chat tokens in
    Qwen's order, and writes tokenizer.json into the folder path."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    # the alphabet is the texts' own characters, not all 256 bytes: a byte the texts never use would be a token
    # the model is never trained on, and sampling at temperature 1 would still draw it
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT, IM_START, IM_END],
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_tokens(["<think>", "</think>"])  # added but not special, as in Qwen3: decode keeps them
    os.makedirs(path, exist_ok=True)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    return Tokenizer(path)
