"""The `moe-llava` suite sends MoE-LLaVA's prompts: for one document of each benchmark, the prompt the
lmms-eval adapter hands to the processor equals the string MoE-LLaVA's evaluation scripts build (golden
strings, written out by hand from moellava/conversation.py and moellava/eval/*.py; docs/benchmarks.md).

How MoE-LLaVA builds each one: `conv_templates[conv_mode]` (system prompt, "USER: ", " ASSISTANT:") around
"<image>\\n" + the question text. The question text is the line of LLaVA's question file (VQAv2, GQA, VizWiz,
TextVQA with OCR tokens, POPE, MME: model_vqa_loader.py), or the question file's text plus "Answer with the
option's letter ..." (ScienceQA, model_vqa_science.py), or built by model_vqa_mmbench.py from the TSV row
(hint, question, A-D). ChartQA and DocVQA are not in MoE-LLaVA's table: the template wraps lmms-eval's text.
"""

from __future__ import annotations

import pytest

from evals import tasks as T

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."

# benchmark -> (fields of its first document, the full prompt MoE-LLaVA sends for it)
DOCS: dict[str, tuple[dict, str]] = {
    "vqav2": ({"question": "What color is the bus?"}, f"What color is the bus?\n{SHORT}"),
    "gqa": (
        {"question": "Is the cup to the left of the plate?"},
        f"Is the cup to the left of the plate?\n{SHORT}",
    ),
    "vizwiz": (
        {"question": "what is in this can?"},
        "What is in this can?\nWhen the provided information is insufficient, respond with 'Unanswerable'."
        f"\n{SHORT}",
    ),
    "scienceqa_img": (
        {
            "question": "Which state is highlighted?",
            "hint": "Figure: the colonies.",
            "choices": ["Maryland", "Vermont", "Ohio"],
            "answer": 0,
        },
        "Context: Figure: the colonies.\nWhich state is highlighted?\nA. Maryland\nB. Vermont\nC. Ohio\n"
        + LETTER,
    ),
    "textvqa": (
        {"question": "what brand is the camera?", "ocr_tokens": ["dakota", "digital", "camera"]},
        f"What brand is the camera?\nReference OCR token: dakota, digital, camera\n{SHORT}",
    ),
    "chartqa": (
        {"question": "What is the highest value?"},
        "What is the highest value?\nAnswer the question with a single word.",
    ),
    "docvqa": ({"question": "What is the date on the form?"}, f"What is the date on the form?\n{SHORT}"),
    "pope": ({"question": "Is there a dog in the image?"}, f"Is there a dog in the image?\n{SHORT}"),
    "mme": (
        {"question": "Is there a cat in this image? Please answer yes or no."},
        f"Is there a cat in this image?\n{SHORT}",
    ),
    "mmbench": (
        {
            "question": "Which month has the most sales?",
            "hint": "The chart shows sales.",
            "A": "May",
            "B": "June",
            "C": "July",
            "D": "August",
        },
        "The chart shows sales.\nWhich month has the most sales?\nA. May\nB. June\nC. July\nD. August\n"
        + LETTER,
    ),
}


def _golden(question_text: str) -> str:
    return f"{SYSTEM} USER: <image>\n{question_text} ASSISTANT:"


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """The tiny suite with the first document of each benchmark (POPE: of its adversarial category)
    rewritten to the fields of `DOCS`."""
    from datasets import load_from_disk

    from evals.testing import write_tiny_suite

    tmp = tmp_path_factory.mktemp("golden")
    generated = write_tiny_suite(tmp / "generated", n=1, image_size=32)
    root = tmp / "mini"
    for name, (fields, _) in DOCS.items():
        dataset = load_from_disk(str(generated / name))
        split = T.MINI_SPLITS[name]
        rows = list(dataset[split])
        first = next(i for i, r in enumerate(rows) if name != "pope" or r["category"] == "adversarial")
        rows[first] = {**rows[first], **fields}
        dataset[split] = dataset[split].from_list(rows, features=dataset[split].features)
        dataset.save_to_disk(str(root / name))
    return root


def test_moellava_suite_prompts_equal_moellavas(suite, tmp_path):
    from lmms_eval.tasks import TaskManager, get_task_dict

    from analysis.capture import _leaf_tasks
    from evals.lmms_model import MODEL_NAME, StgcMoeLlava
    from evals.testing import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "checkpoint-0", chat_template="moellava_phi")
    lm = StgcMoeLlava(pretrained=str(ckpt), batch_size=1)
    sent: list[str] = []
    inputs = lm._inputs
    lm._inputs = lambda prompts, visuals: (sent.extend(prompts), inputs(prompts, visuals))[1]

    task_dir = T.write_task_dir(tmp_path / "tasks", source="mini", mini_root=suite)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False, model_name=MODEL_NAME)
    leaves = dict(_leaf_tasks(get_task_dict(list(T.SUITES[T.MOE_LLAVA]), manager)))
    checked = set()
    for name, task in leaves.items():
        benchmark = T.TASKS[name].benchmark
        if name in ("stgc_pope_moellava_pop", "stgc_pope_moellava_random"):
            continue  # POPE's golden document is in the adversarial category
        task.build_all_requests(limit=1, rank=0, world_size=1)
        lm.task_dict[name] = task.dataset
        request = task.instances[0]
        request.args[1]["max_new_tokens"] = 2  # the prompt is what is checked; keep the generation short
        sent.clear()
        (reply,) = lm.generate_until([request])
        assert sent == [_golden(DOCS[benchmark][1])], name
        checked.add(benchmark)
    assert checked == set(DOCS)


def test_moellava_generation_settings():
    """max_new_tokens as MoE-LLaVA's scripts: 1024 for MMBench and ScienceQA (model_vqa_mmbench.py,
    model_vqa_science.py), generation stopped at EOS only."""
    from tests.test_evals_tasks import _resolved_template

    for name in ("stgc_mmbench_en_dev_moellava", "stgc_scienceqa_img_moellava"):
        gen = _resolved_template(name)["generation_kwargs"]
        assert gen["max_new_tokens"] == 1024 and "until" not in gen, name
