"""A fake LLM judge: `FakeLLMServer` answering grading prompts with TinyStories-style grades.

The scores are a pure function of the completion (`expected_grade`), so tests can check what was
written. Answers rotate through formats (a final JSON line, "Grammar: 8/10" lines, Arabic-Indic
digits in a fenced JSON block). Besides the base server's failure modes ("429", "500",
"malformed" bodies, "timeout"), mode "bad_grade" answers prose without any scores and mode
"old_style" answers in the first prompt version's format (no plot). With `jitter=p`, each score of
an answer moves one point (up, or down from 10) with probability p, as a judge sampled at
temperature > 0 would: two grades of one item then differ by at most one point.
"""

from __future__ import annotations

import hashlib
import re

from helpers_llm_server import FakeLLMServer

_ARABIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")


def expected_grade(completion: str) -> tuple[int, int, int, int, str]:
    """(grammar, creativity, consistency, plot, age group) the fake judge gives a completion."""
    h = hashlib.sha256(completion.strip().encode()).digest()
    return 1 + h[0] % 10, 1 + h[1] % 10, 1 + h[2] % 10, 1 + h[4] % 10, "ABCDEF"[h[3] % 6]


def judge_answer(prompt: str, jitter: list[bool] | None = None) -> str:
    completion = re.search(r"completion:\n\n.*? \*\*\* (.*?)\n\nFirst, give", prompt, re.S)[1]
    *scores, age = expected_grade(completion)
    moved = zip(scores, jitter or [False] * 4, strict=True)
    g, c, k, p = (s + (1 if s < 10 else -1) * j for s, j in moved)
    text = "The student continues the story well, though some agreement errors remain."
    style = int(hashlib.sha256(completion.encode()).hexdigest(), 16) % 3
    block = (
        f'{{"grammar": {g}, "creativity": {c}, "consistency": {k}, "plot": {p}, '
        f'"age_group": "{age}"}}'
    )
    if style == 0:
        return f"{text}\n{block}"
    if style == 1:
        lines = f"Grammar: {g}/10\nCreativity: {c}/10\nConsistency: {k}/10\nPlot: {p}/10"
        return f"{text}\n\n{lines}\nAge group: {age}"
    return f"{text}\n```json\n{block.translate(_ARABIC)}\n```"


class FakeJudgeServer(FakeLLMServer):
    """`with FakeJudgeServer(fail={"bad_grade": 0.2, "429": 0.1}) as srv:` then `srv.url`."""

    def __init__(self, *args, jitter: float = 0.0, **kw):
        super().__init__(*args, **kw)
        self.jitter = jitter

    def answer(self, prompt: str) -> tuple[str, str]:
        mode = self._draw()
        with self.lock:
            self.counts[mode] += 1
            moved = [self.rng.random() < self.jitter for _ in range(4)] if self.jitter else None
        if mode == "bad_grade":
            return mode, "A lovely story, well done, keep writing!"
        if mode == "old_style":
            answer = judge_answer(prompt)
            return mode, re.sub(r',? ?"plot": \d+|\nPlot: \d+/10', "", answer)
        return mode, judge_answer(prompt, moved)
