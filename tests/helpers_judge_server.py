"""A fake LLM judge: `FakeLLMServer` answering grading prompts with TinyStories-style grades.

The scores are a pure function of the completion (`expected_grade`), so tests can check what was
written. Answers rotate through formats (a final JSON line, "Grammar: 8/10" lines, Arabic-Indic
digits in a fenced JSON block). Besides the base server's failure modes ("429", "500",
"malformed" bodies, "timeout"), mode "bad_grade" answers prose without any scores.
"""

from __future__ import annotations

import hashlib
import re

from helpers_llm_server import FakeLLMServer

_ARABIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")


def expected_grade(completion: str) -> tuple[int, int, int, str]:
    h = hashlib.sha256(completion.strip().encode()).digest()
    return 1 + h[0] % 10, 1 + h[1] % 10, 1 + h[2] % 10, "ABCDEF"[h[3] % 6]


def judge_answer(prompt: str) -> str:
    completion = re.search(r"completion:\n\n.*? \*\*\* (.*?)\n\nFirst, give", prompt, re.S)[1]
    g, c, k, age = expected_grade(completion)
    text = "The student continues the story well, though some agreement errors remain."
    style = int(hashlib.sha256(completion.encode()).hexdigest(), 16) % 3
    block = f'{{"grammar": {g}, "creativity": {c}, "consistency": {k}, "age_group": "{age}"}}'
    if style == 0:
        return f"{text}\n{block}"
    if style == 1:
        return (
            f"{text}\n\nGrammar: {g}/10\nCreativity: {c}/10\nConsistency: {k}/10\nAge group: {age}"
        )
    return f"{text}\n```json\n{block.translate(_ARABIC)}\n```"


class FakeJudgeServer(FakeLLMServer):
    """`with FakeJudgeServer(fail={"bad_grade": 0.2, "429": 0.1}) as srv:` then `srv.url`."""

    def answer(self, prompt: str) -> tuple[str, str]:
        mode = self._draw()
        with self.lock:
            self.counts[mode] += 1
        if mode == "bad_grade":
            return mode, "A lovely story, well done, keep writing!"
        return mode, judge_answer(prompt)
