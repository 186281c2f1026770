"""TinyStories-style prompts written in Arabic, deterministic in (seed, story index).

Each prompt names a verb, a noun and an adjective (in quotes) that the story must use, one to three
story features, a main character's name and a setting, as in Eldan & Li (2023), section 2.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

# Simple words a three-to-five-year-old knows. Verbs are past-tense, masculine singular (the
# dictionary form); sound verbs are preferred so that `validate.has_word` can match their forms.
VERBS = (
    "لعب", "ركض", "قفز", "ضحك", "رسم", "أكل", "شرب", "نام", "سبح", "غنى", "بنى", "فتح", "جلس",
    "حمل", "وجد", "طبخ", "زرع", "كتب", "ساعد", "شارك", "سمع", "نظر", "رقص", "صعد", "نزل", "دخل",
    "خرج", "غسل", "لبس", "حفر", "صنع", "قطف", "عبر", "طار", "بكى", "جمع", "رتب", "شكر", "تعلم",
)  # fmt: skip
NOUNS = (
    "كرة", "قطة", "كلب", "شجرة", "بيت", "سيارة", "وردة", "بحر", "قمر", "شمس", "كتاب", "تفاحة",
    "طائر", "سمكة", "حديقة", "باب", "نافذة", "قارب", "بالون", "دمية", "حصان", "أرنب", "نهر",
    "جبل", "نجمة", "مطر", "خبز", "حليب", "قلم", "لعبة", "صندوق", "مفتاح", "غيمة", "فراشة",
    "سلحفاة", "قبعة", "حذاء", "مظلة", "كعكة", "جسر",
)  # fmt: skip
ADJECTIVES = (
    "كبير", "صغير", "جميل", "سعيد", "حزين", "سريع", "بطيء", "لطيف", "طويل", "قصير", "نظيف",
    "جديد", "قديم", "ملون", "لامع", "ناعم", "دافئ", "بارد", "هادئ", "شجاع", "ذكي", "مضحك",
    "غريب", "ثقيل", "خفيف", "حلو", "مبلل", "جائع", "متعب", "فرحان", "كريم", "صادق",
)  # fmt: skip
FEATURES = {
    "dialogue": "يجب أن تحتوي القصة على حوار بين الشخصيات.",
    "plot_twist": "يجب أن تحتوي القصة على تحوّل مفاجئ في الأحداث.",
    "bad_ending": "يجب أن تكون نهاية القصة حزينة أو غير سعيدة.",
    "moral_value": "يجب أن تحمل القصة درسًا أخلاقيًا أو قيمة جميلة.",
    "foreshadowing": "يجب أن تلمّح القصة في بدايتها إلى ما سيحدث لاحقًا.",
    "conflict": "يجب أن تحتوي القصة على مشكلة أو خلاف تحلّه الشخصيات.",
}
NAMES = (
    "سارة", "عمر", "ليلى", "يوسف", "مريم", "علي", "نور", "خالد", "فاطمة", "أحمد", "هدى", "سليم",
    "جود", "زيد", "ريم", "كريم", "سلمى", "آدم", "دانة", "ياسين", "لينا", "حمزة", "رنا", "مازن",
    "هالة", "سامي", "تالا", "فارس", "منى", "بلال",
)  # fmt: skip
SETTINGS = (
    "حديقة البيت", "شاطئ البحر", "غابة خضراء", "مزرعة الجد", "قرية صغيرة", "المدرسة",
    "سوق المدينة", "الصحراء", "جبل عالٍ", "ضفة النهر", "المطبخ", "غرفة النوم", "الحديقة العامة",
    "سفينة في البحر", "مكتبة الحي",
)  # fmt: skip

SYSTEM = "أنت كاتب قصص أطفال. تكتب باللغة العربية الفصحى البسيطة فقط."


@dataclass(frozen=True)
class PromptSpec:
    """One story's prompt and what it asked for."""

    index: int
    prompt: str
    words: dict  # {"verb": ..., "noun": ..., "adjective": ...}
    features: tuple[str, ...]
    name: str
    setting: str


def make_prompt(seed: int, index: int) -> PromptSpec:
    """The prompt of story `index` (same seed and index, same prompt, on any machine)."""
    rng = random.Random(f"jaxlm-synth:{seed}:{index}")
    words = {
        "verb": rng.choice(VERBS),
        "noun": rng.choice(NOUNS),
        "adjective": rng.choice(ADJECTIVES),
    }
    features = tuple(sorted(rng.sample(sorted(FEATURES), rng.randint(1, 3))))
    name, setting = rng.choice(NAMES), rng.choice(SETTINGS)
    lines = [
        "اكتب قصة قصيرة (من ثلاث إلى خمس فقرات) بكلمات بسيطة جدًا "
        "يفهمها طفل عمره ثلاث أو أربع سنوات.",
        f'يجب أن تستخدم القصة الفعل "{words["verb"]}" والاسم "{words["noun"]}" '
        f'والصفة "{words["adjective"]}".',
        *(FEATURES[f] for f in features),
        f'اسم الشخصية الرئيسية "{name}"، وتجري أحداث القصة في {setting}.',
        "اكتب القصة فقط، بلا عنوان ولا مقدمة ولا شرح.",
    ]
    return PromptSpec(index, "\n".join(lines), words, features, name, setting)


def template_sha256() -> str:
    """A hash of the prompts themselves (the system prompt, the word lists, the features and the
    template, through the prompts of a fixed sample of indices): a synthesis output records it,
    so a resume with edited prompts is refused rather than mixing two kinds of stories."""
    sample = [make_prompt(0, i).prompt for i in range(64)]
    parts = [SYSTEM, VERBS, NOUNS, ADJECTIVES, FEATURES, NAMES, SETTINGS, sample]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()
