# ruff: noqa: E501  (Arabic story templates read best as one f-string per sentence)
"""A built-in generator of simple Arabic children's stories: the default corpus for demos and tests.

Two styles share the same story skeletons (plot, places, objects, animals, wording), drawn from the
same random stream, so story i of `native` and story i of `translated` (same seed) tell the same
tale. The only systematic differences are what the later SAE analysis looks for:

* `native`: Arabic given names (`ARABIC_NAMES`) and Arabic dialogue punctuation,
  `قالت سلمى: «...»`.
* `translated`: English TinyStories names transliterated (`ENGLISH_NAMES_AR`) and English
  dialogue order, as machine translation leaves it: `قالت ليلي، "..."` or `"..." قال توم.`

`english_name_share` < 1 (translated style only) gives each of the two characters an English
name with that probability and an Arabic one otherwise, dialogue order unchanged: a model trained
on share 1.0 writes English names with probability ~1, a rate at its ceiling that ablating SAE
features cannot be seen to move, so the causal check needs a pretrained English-name rate inside
(0, 1). Each character's list is drawn from a stream of its own, and its name is the one it has
in that list's style (the English name of share 1.0, the Arabic name of the `native` story with
the same index and seed), so the plot, the genders and the dialogue are those of share 1.0, and
share 1.0 is the same text as before the option existed.

Grammar: every character has a gender, and verbs, adjectives, pronoun suffixes and the
second-person forms in dialogue agree with it (Modern Standard Arabic, without case endings).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Literal

Style = Literal["native", "translated"]
STYLES = ("native", "translated")

# (name, gender) — gender "m" or "f".
ARABIC_NAMES = [
    ("سلمى", "f"), ("يوسف", "m"), ("ليلى", "f"), ("عمر", "m"), ("مريم", "f"), ("خالد", "m"),
    ("فاطمة", "f"), ("أحمد", "m"), ("نور", "f"), ("علي", "m"), ("هدى", "f"), ("كريم", "m"),
    ("ريم", "f"), ("حسن", "m"), ("زينب", "f"), ("سامي", "m"), ("لينا", "f"), ("طارق", "m"),
    ("هند", "f"), ("ياسر", "m"), ("آمنة", "f"), ("إبراهيم", "m"), ("رنا", "f"), ("ماجد", "m"),
    ("جنى", "f"), ("حمزة", "m"), ("شهد", "f"), ("بلال", "m"),
]  # fmt: skip
ENGLISH_NAMES_AR = [
    ("ليلي", "f"), ("تيم", "m"), ("توم", "m"), ("بن", "m"), ("سو", "f"), ("ماكس", "m"),
    ("لوسي", "f"), ("جاك", "m"), ("آنا", "f"), ("ميا", "f"), ("سام", "m"), ("إيمي", "f"),
    ("بوب", "m"), ("جيل", "f"), ("إيما", "f"), ("تيمي", "m"), ("بيلي", "m"), ("مولي", "f"),
    ("زوي", "f"), ("جين", "f"), ("كيت", "f"), ("جو", "m"), ("مارك", "m"), ("ستيف", "m"),
    ("كلوي", "f"), ("فريد", "m"), ("روزي", "f"), ("داني", "m"),
]  # fmt: skip

# Places: (definite noun for "في X" / "إلى X").
PLACES = [
    "الحديقة", "الشاطئ", "السوق", "الغابة", "ضفة النهر", "المدرسة", "المزرعة", "بيت الجدة",
    "الملعب", "الواحة", "الحي القديم", "سفح الجبل", "البستان", "المكتبة", "حديقة الحيوان",
    "ساحة القرية", "البحيرة", "الصحراء", "الميناء", "الحقل",
]  # fmt: skip
TOWNS = [
    "قرية صغيرة قرب البحر", "مدينة كبيرة مليئة بالأشجار", "بيت أبيض بجانب النهر",
    "قرية هادئة بين الجبال", "حي جميل في المدينة", "بيت صغير قرب الغابة",
    "واحة خضراء في الصحراء", "مزرعة واسعة", "بلدة على شاطئ البحر", "بيت قديم له حديقة كبيرة",
]  # fmt: skip
# Objects: (indefinite, definite, gender).
OBJECTS = [
    ("كرة", "الكرة", "f"), ("طائرة ورقية", "الطائرة الورقية", "f"), ("دمية", "الدمية", "f"),
    ("قبعة", "القبعة", "f"), ("سيارة صغيرة", "السيارة الصغيرة", "f"), ("كتاب", "الكتاب", "m"),
    ("قلم", "القلم", "m"), ("صندوق", "الصندوق", "m"), ("مفتاح", "المفتاح", "m"),
    ("بالون", "البالون", "m"), ("قارب ورقي", "القارب الورقي", "m"), ("حقيبة", "الحقيبة", "f"),
    ("مظلة", "المظلة", "f"), ("وشاح", "الوشاح", "m"), ("حجر", "الحجر", "m"),
    ("صدفة", "الصدفة", "f"), ("ساعة", "الساعة", "f"), ("دراجة", "الدراجة", "f"),
    ("فانوس", "الفانوس", "m"), ("مشط", "المشط", "m"), ("خاتم", "الخاتم", "m"),
    ("سلة", "السلة", "f"), ("وردة", "الوردة", "f"), ("ريشة", "الريشة", "f"),
]  # fmt: skip
# Object adjectives: (masculine, feminine).
OBJ_ADJ = [
    ("أحمر", "حمراء"), ("أزرق", "زرقاء"), ("أصفر", "صفراء"), ("أخضر", "خضراء"),
    ("جميل", "جميلة"), ("لامع", "لامعة"), ("كبير", "كبيرة"), ("جديد", "جديدة"),
    ("ملون", "ملونة"), ("قديم", "قديمة"), ("غريب", "غريبة"), ("ناعم", "ناعمة"),
]  # fmt: skip
# Animals: (indefinite, definite, gender).
ANIMALS = [
    ("قطة", "القطة", "f"), ("كلب", "الكلب", "m"), ("عصفور", "العصفور", "m"),
    ("أرنب", "الأرنب", "m"), ("سلحفاة", "السلحفاة", "f"), ("بطة", "البطة", "f"),
    ("حصان", "الحصان", "m"), ("فراشة", "الفراشة", "f"), ("سنجاب", "السنجاب", "m"),
    ("ضفدع", "الضفدع", "m"), ("بومة", "البومة", "f"), ("خروف", "الخروف", "m"),
    ("بقرة", "البقرة", "f"), ("جمل", "الجمل", "m"), ("قرد", "القرد", "m"),
    ("سمكة", "السمكة", "f"), ("نحلة", "النحلة", "f"), ("غزال", "الغزال", "m"),
]  # fmt: skip
# Person adjectives: (masculine, feminine).
TRAITS = [
    ("ذكيًا", "ذكية"), ("شجاعًا", "شجاعة"), ("لطيفًا", "لطيفة"), ("نشيطًا", "نشيطة"),
    ("فضوليًا", "فضولية"), ("مرحًا", "مرحة"), ("هادئًا", "هادئة"), ("طيبًا", "طيبة"),
    ("كريمًا", "كريمة"), ("صبورًا", "صبورة"), ("خجولًا", "خجولة"), ("مجتهدًا", "مجتهدة"),
]  # fmt: skip
# Hobbies, after "يحب/تحب".
HOBBIES = [
    "الرسم بالألوان", "اللعب بالكرة", "قراءة القصص", "جمع الأحجار الملونة", "الغناء",
    "ركوب الدراجة", "زراعة الزهور", "السباحة", "بناء البيوت من الرمل", "مراقبة النجوم",
    "الجري في الحقول", "صنع الطائرات الورقية", "إطعام العصافير", "حل الألغاز",
]  # fmt: skip
TIMES = [
    "في صباح يوم مشمس", "في يوم ربيعي جميل", "في مساء يوم هادئ", "في يوم صيفي حار",
    "في صباح يوم بارد", "في يوم عطلة", "بعد المدرسة", "في يوم غائم",
]  # fmt: skip
FEELINGS = [("سعيدًا", "سعيدة"), ("فرحًا", "فرحة"), ("مسرورًا", "مسرورة")]
SAD = [("حزينًا", "حزينة"), ("قلقًا", "قلقة"), ("خائفًا", "خائفة")]
# Morals by plot: a story's lesson fits what happened in it.
MORALS = {
    "lost": ["أن الأصدقاء يساعد بعضهم بعضًا", "أن الترتيب يوفر الوقت", "أن الصبر مفتاح الفرج"],
    "animal": ["أن الرفق بالحيوان واجب", "أن مساعدة الضعيف تفرح القلب", "أن الرحمة خلق جميل"],
    "try": ["أن المحاولة مرة بعد مرة تقود إلى النجاح", "أن العمل معًا أسهل من العمل وحيدًا"],
    "share": ["أن المشاركة تجعل اللعب أجمل", "أن الاعتذار يصلح ما أفسده الغضب"],
    "fear": ["أن الخوف يصغر عندما نواجهه", "أن الحديث عن الخوف يخففه"],
    "gift": ["أن الهدية الصغيرة تصنع فرحًا كبيرًا", "أن الكلمة الطيبة تفرح القلوب"],
    "rain": ["أن الفرح ممكن في كل حال", "أن الفكرة الجيدة تغير اليوم كله"],
    "cook": ["أن التمهل يصنع عملًا أفضل", "أن الخطأ يعلمنا"],
}
PARENTS = [
    ("أبوه", "أبوها", "m"),
    ("أمه", "أمها", "f"),
    ("جده", "جدها", "m"),
    ("جدته", "جدتها", "f"),
]


def g(pair: tuple[str, str], gender: str) -> str:
    """The masculine or feminine form of a (m, f) pair."""
    return pair[0] if gender == "m" else pair[1]


class _Char:
    def __init__(self, name: str, gender: str):
        self.name, self.gender = name, gender

    def v(self, m: str, f: str | None = None) -> str:
        """Past verb agreeing with this character: f defaults to m + ت."""
        return m if self.gender == "m" else (f or m + "ت")

    def p(self, m: str, f: str) -> str:
        return m if self.gender == "m" else f


class _Teller:
    """Renders dialogue in the chosen style; names come from the style's list."""

    def __init__(self, style: Style, rng: random.Random):
        self.style, self.rng = style, rng

    def say(self, who: _Char, words: str, verb: tuple[str, str] = ("قال", "قالت")) -> str:
        v = g(verb, who.gender)
        if self.style == "native":
            return f"{v} {who.name}: «{words}»"
        if self.rng.random() < 0.5:
            return f'{v} {who.name}، "{words}"'
        return f'"{words}" {v} {who.name}.'


def _obj_phrase(rng: random.Random) -> tuple[str, str, str]:
    """(indefinite phrase, definite phrase, gender) of an object with an agreeing adjective."""
    indef, definite, gen = rng.choice(OBJECTS)
    adj = g(rng.choice(OBJ_ADJ), gen)
    return f"{indef} {adj}", f"{definite} ال{adj}", gen


def _opening(r: random.Random, hero: _Char, friend: _Char) -> list[str]:
    trait, hobby = g(r.choice(TRAITS), hero.gender), r.choice(HOBBIES)
    child = hero.p("ولد صغير", "بنت صغيرة")
    lives = hero.p("يعيش", "تعيش")
    first = r.choice([
        f"كان يا ما كان، في {r.choice(TOWNS)}، {hero.v('عاش', 'عاشت')} {child} {hero.p('اسمه', 'اسمها')} {hero.name}.",
        f"في {r.choice(TOWNS)}، {hero.p('كان', 'كانت')} {lives} {child} {hero.p('اسمه', 'اسمها')} {hero.name}.",
        f"{hero.name} {child} {lives} في {r.choice(TOWNS)}.",
    ])  # fmt: skip
    second = r.choice([
        f"{hero.p('كان', 'كانت')} {hero.name} {trait}، {hero.p('ويحب', 'وتحب')} {hobby} كثيرًا.",
        f"{hero.p('كان', 'كانت')} {hero.p('يحب', 'تحب')} {hobby}، {hero.p('وكان', 'وكانت')} {trait} مع الجميع.",
    ])  # fmt: skip
    third = r.choice([
        f"{hero.p('وكان', 'وكانت')} {hero.p('يعيش', 'تعيش')} مع {hero.p('أبيه وأمه', 'أبيها وأمها')} في بيت صغير دافئ.",
        f"{friend.p('وكان', 'وكانت')} {hero.p('له', 'لها')} صديق{friend.p('', 'ة')} {friend.p('اسمه', 'اسمها')} {friend.name}، {friend.p('يلعب', 'تلعب')} مع{hero.p('ه', 'ها')} كل يوم.",
        f"{hero.p('وكان', 'وكانت')} {hero.p('يستيقظ', 'تستيقظ')} كل صباح مبكرًا {hero.p('ليساعد', 'لتساعد')} {hero.p('أمه', 'أمها')} في البيت.",
    ])  # fmt: skip
    return [first, second, third]


def _plot_lost(r, t: _Teller, hero: _Char, friend: _Char) -> list[str]:
    ind, obj, og = _obj_phrase(r)
    place = r.choice(PLACES)
    it = "ه" if og == "m" else "ها"
    return [
        f"{r.choice(TIMES)}، {hero.v('أخذ', 'أخذت')} {hero.name} {ind} إلى {place}.",
        f"{hero.v('لعب', 'لعبت')} {hero.name} كثيرًا، ثم {hero.v('نظر', 'نظرت')} حوله{'' if hero.gender == 'm' else 'ا'} فلم {hero.p('يجد', 'تجد')} {obj}.",
        f"{hero.v('شعر', 'شعرت')} {hero.name} بالحزن {hero.v('وبدأ', 'وبدأت')} {hero.p('يبحث', 'تبحث')} تحت الأشجار وبين الصخور.",
        f"{friend.v('مر', 'مرت')} {friend.name} {friend.v('ورأى', 'ورأت')} {hero.name} {g(r.choice(SAD), hero.gender)}.",
        t.say(
            friend,
            f"ماذا حدث يا {hero.name}؟ لماذا {hero.p('أنت حزين', 'أنت حزينة')}؟",
            ("سأل", "سألت"),
        ),
        t.say(hero, f"لقد أضعت {obj}، ولا أعرف أين {'هو' if og == 'm' else 'هي'}."),
        t.say(friend, f"لا {hero.p('تحزن', 'تحزني')}، سأساعدك في البحث."),
        f"{r.choice(['بحثا معًا', 'فتشا معًا', 'دار الاثنان'])} في كل مكان، حتى {friend.v('رأى', 'رأت')} {friend.name} {obj} قرب شجرة كبيرة.",
        f"{hero.v('فرح', 'فرحت')} {hero.name} {hero.v('وأخذ', 'وأخذت')}{it} {r.choice(['بسرعة', 'بفرح', 'بحذر'])}.",
        t.say(hero, f"شكرًا لك يا {friend.name}! {friend.p('أنت صديق رائع', 'أنت صديقة رائعة')}."),
    ]


def _plot_animal(r, t: _Teller, hero: _Char, friend: _Char) -> list[str]:
    ind, an, ag = r.choice(ANIMALS)
    place = r.choice(PLACES)
    a = _Char(an, ag)
    food = r.choice(["قليلًا من الماء", "بعض الحبوب", "قطعة خبز", "بعض أوراق الخس", "حبات من التمر"])
    return [
        f"{r.choice(TIMES)}، {hero.v('ذهب', 'ذهبت')} {hero.name} مع {friend.name} إلى {place}.",
        f"هناك {hero.v('سمع', 'سمعت')} صوتًا ضعيفًا، {hero.v('فوجد', 'فوجدت')} {ind}{a.p('ًا', '')} {a.p('صغيرًا', 'صغيرة')} {a.p('يرتجف', 'ترتجف')} تحت شجرة.",
        t.say(
            hero,
            f"{friend.p('انظر', 'انظري')}! {an} {a.p('جائع ومتعب', 'جائعة ومتعبة')}.",
            ("صاح", "صاحت"),
        ),
        t.say(
            friend,
            f"{a.p('ربما ضل', 'ربما ضلت')} الطريق. هيا نساعد{a.p('ه', 'ها')}.",
            ("همس", "همست"),
        ),
        f"{hero.v('أحضر', 'أحضرت')} {hero.name} {food}، {a.v('وأكل', 'وأكلت')} {an} ببطء.",
        f"بعد قليل، {a.v('شعر', 'شعرت')} {an} بالراحة {a.v('وبدأ', 'وبدأت')} {a.p('يقفز', 'تقفز')} حولهما.",
        f"ثم {a.v('عاد', 'عادت')} {an} إلى {a.p('أمه', 'أمها')} التي كانت تبحث عن{a.p('ه', 'ها')}.",
        t.say(
            hero,
            r.choice(
                [
                    "ما أجمل أن نساعد الآخرين!",
                    "أنا سعيد لأننا ساعدناه."
                    if hero.gender == "m" and ag == "m"
                    else "ما أجمل هذا اليوم!",
                ]
            ),
        ),
    ]


def _plot_try(r, t: _Teller, hero: _Char, friend: _Char) -> list[str]:
    goal, fix = r.choice([
        ("تسلق الشجرة العالية", "أن نضع صندوقًا كبيرًا تحت الشجرة"),
        ("بناء قلعة من الرمل", "أن نبلل الرمل بالماء أولًا"),
        ("إطلاق الطائرة الورقية", "أن نركض معًا عندما تهب الريح"),
        ("عبور الجدول الصغير", "أن نضع حجارة كبيرة في الماء"),
        ("قطف التفاحة الحمراء", "أن نستعمل عصا طويلة"),
        ("إصلاح العش المكسور", "أن نجمع أغصانًا صغيرة وقشًا"),
    ])  # fmt: skip
    place = r.choice(PLACES)
    return [
        f"{r.choice(TIMES)}، {hero.v('أراد', 'أرادت')} {hero.name} {goal} في {place}.",
        f"{hero.v('حاول', 'حاولت')} مرة، ثم {hero.v('حاول', 'حاولت')} مرة أخرى، لكن{hero.p('ه', 'ها')} لم {hero.p('ينجح', 'تنجح')}.",
        f"{hero.v('جلس', 'جلست')} {hero.name} على الأرض {hero.p('حزينًا', 'حزينة')}.",
        f"{friend.v('جاء', 'جاءت')} {friend.name} {friend.v('واقترب', 'واقتربت')} من{hero.p('ه', 'ها')}.",
        t.say(hero, f"أريد {goal}، لكن الأمر صعب جدًا."),
        t.say(friend, f"لدي فكرة! ما رأيك {fix}؟"),
        f"{r.choice([f'عمل {_pair(hero, friend)} معًا', 'تعاون الاثنان', f'بدأ {_pair(hero, friend)} العمل'])}، وبعد قليل {hero.v('نجح', 'نجحت')} {hero.name} في {goal}.",
        t.say(hero, r.choice(["لقد فعلناها!", "هذا رائع!", "ما أجمل العمل معًا!"]), ("صاح", "صاحت")),
    ]


def _plot_share(r, t: _Teller, hero: _Char, friend: _Char) -> list[str]:
    ind, obj, og = _obj_phrase(r)
    it = "ه" if og == "m" else "ها"
    return [
        f"{r.choice(TIMES)}، {hero.v('حصل', 'حصلت')} {hero.name} على {ind} هدية من {r.choice(PARENTS)[0 if hero.gender == 'm' else 1]}.",
        f"{hero.v('خرج', 'خرجت')} {hero.name} إلى {r.choice(PLACES)} {hero.p('ليلعب', 'لتلعب')} ب{it}.",
        f"{friend.v('رأى', 'رأت')} {friend.name} {obj} {friend.v('واقترب', 'واقتربت')} بخجل.",
        t.say(friend, f"هل يمكنني أن ألعب مع{hero.p('ك', 'ك')} قليلًا؟", ("سأل", "سألت")),
        t.say(hero, f"لا، {'هذا' if og == 'm' else 'هذه'} لي وحدي!"),
        f"{friend.v('ذهب', 'ذهبت')} {friend.name} {friend.p('حزينًا', 'حزينة')}، {friend.v('وجلس', 'وجلست')} وحد{friend.p('ه', 'ها')}.",
        f"بعد قليل، {hero.v('شعر', 'شعرت')} {hero.name} بالملل، فاللعب وحيدًا ليس ممتعًا.",
        t.say(
            hero,
            f"أنا آسف{'' if hero.gender == 'm' else 'ة'} يا {friend.name}. {friend.p('تعال', 'تعالي')} نلعب معًا!",
        ),
        f"{r.choice([f'لعب {_pair(hero, friend)}', f'ضحك {_pair(hero, friend)} ولعبا', f'قضى {_pair(hero, friend)} وقتًا ممتعًا'])} حتى غابت الشمس.",
    ]


def _plot_fear(r, t: _Teller, hero: _Char, friend: _Char) -> list[str]:
    fear = r.choice(
        [
            "صوت الرعد",
            "الظلام في الغرفة",
            "الكلب الكبير عند الباب",
            "الماء العميق",
            "ظل الشجرة على الجدار",
        ]
    )
    par_m, par_f, pg = r.choice(PARENTS)
    parent = _Char(par_m if hero.gender == "m" else par_f, pg)
    return [
        f"{r.choice(['في ليلة ممطرة', 'في مساء يوم عاصف', 'في ليلة مظلمة', 'ذات مساء'])}، {hero.v('خاف', 'خافت')} {hero.name} من {fear}.",
        f"{hero.v('ركض', 'ركضت')} {hero.name} إلى {parent.name} {hero.v('واختبأ', 'واختبأت')} خلف{parent.p('ه', 'ها')}.",
        t.say(hero, f"أنا خائف{'' if hero.gender == 'm' else 'ة'} جدًا!", ("همس", "همست")),
        f"{parent.v('ابتسم', 'ابتسمت')} {parent.name} {parent.v('وضم', 'وضمت')} {hero.name}.",
        t.say(
            parent,
            f"لا {hero.p('تخف', 'تخافي')} يا صغير{hero.p('ي', 'تي')}. {fear} لا يؤذينا، وأنا معك.",
        ),
        f"في الصباح، {hero.v('حكى', 'حكت')} {hero.name} لصديق{friend.p('ه', 'ته') if hero.gender == 'm' else friend.p('ها', 'تها')} {friend.name} ما حدث.",
        t.say(friend, f"أنا أيضًا كنت أخاف، لكنني الآن {friend.p('شجاع', 'شجاعة')} مثلك."),
    ]


def _plot_gift(r, t: _Teller, hero: _Char, friend: _Char) -> list[str]:
    par_m, par_f, pg = r.choice(PARENTS)
    parent = _Char(par_m if hero.gender == "m" else par_f, pg)
    gift = r.choice(
        [
            "بطاقة ملونة",
            "كعكة صغيرة",
            "باقة من الزهور",
            "رسمة جميلة",
            "عقدًا من الخرز",
            "سلة من الفاكهة",
        ]
    )
    return [
        f"{r.choice(TIMES)}، {hero.v('تذكر', 'تذكرت')} {hero.name} أن اليوم هو عيد ميلاد {parent.name}.",
        f"{hero.v('أراد', 'أرادت')} {hero.name} أن {hero.p('يصنع', 'تصنع')} {gift}، لكن{hero.p('ه', 'ها')} لم {hero.p('يعرف', 'تعرف')} كيف.",
        t.say(hero, f"هل {friend.p('تساعدني', 'تساعدينني')} يا {friend.name}؟", ("سأل", "سألت")),
        t.say(friend, "بالطبع! هيا نبدأ الآن.", ("أجاب", "أجابت")),
        f"عمل {_pair(hero, friend)} طوال اليوم في {r.choice(PLACES)}، وكان العمل صعبًا لكنه ممتع.",
        f"في المساء، {hero.v('قدم', 'قدمت')} {hero.name} الهدية إلى {parent.name}.",
        f"{parent.v('فرح', 'فرحت')} {parent.name} كثيرًا {parent.v('وعانق', 'وعانقت')} {hero.name}.",
        t.say(parent, f"هذه أجمل هدية! شكرًا لك يا حبيب{hero.p('ي', 'تي')}."),
    ]


def _pair(a: _Char, b: _Char) -> str:
    """ "The two friends": feminine dual only when both are girls."""
    return "الصديقتان" if a.gender == b.gender == "f" else "الصديقان"


def _plot_rain(r, t: _Teller, hero: _Char, friend: _Char) -> list[str]:
    food = r.choice(["الخبز والجبن", "التفاح والبرتقال", "الفطائر والعصير", "التمر والحليب"])
    game = r.choice(
        ["خيمة من البطانيات", "قلعة من الوسائد", "مسرحًا صغيرًا للدمى", "سفينة من الكراسي"]
    )
    return [
        f"{r.choice(TIMES)}، {hero.v('خطط', 'خططت')} {hero.name} و{friend.name} لنزهة في {r.choice(PLACES)}.",
        f"{hero.v('وضع', 'وضعت')} {hero.name} {food} في سلة كبيرة، {hero.v('وخرج', 'وخرجت')} مع {friend.name} {hero.p('مسرورًا', 'مسرورة')}.",
        "لكن السماء امتلأت بالغيوم فجأة، وبدأ المطر ينزل بقوة.",
        t.say(friend, "ماذا نفعل الآن؟ لقد ضاعت نزهتنا!", ("سأل", "سألت")),
        f"{hero.v('فكر', 'فكرت')} {hero.name} قليلًا، ثم {hero.v('ابتسم', 'ابتسمت')}.",
        t.say(hero, f"لا بأس! هيا نعود إلى البيت ونصنع {game}، ونأكل هناك."),
        f"ركض {_pair(hero, friend)} إلى البيت، وصنعا {game} في غرفة الجلوس.",
        f"جلسا تحت{'ها' if game.startswith(('خيمة', 'قلعة', 'سفينة')) else 'ه'} يأكلان ويستمعان إلى صوت المطر على النافذة.",
        t.say(friend, "هذه أجمل نزهة في حياتي!", ("ضحك", "ضحكت")),
    ]


def _plot_cook(r, t: _Teller, hero: _Char, friend: _Char) -> list[str]:
    par_m, par_f, pg = r.choice(PARENTS)
    parent = _Char(par_m if hero.gender == "m" else par_f, pg)
    dish = r.choice(
        ["كعكة بالعسل", "خبزًا ساخنًا", "فطائر بالزعتر", "حلوى بالتمر", "بسكويتًا بالسمسم"]
    )
    return [
        f"{r.choice(TIMES)}، {hero.v('دخل', 'دخلت')} {hero.name} المطبخ مع {parent.name} {parent.p('ليصنعا', 'لتصنعا')} {dish}.",
        f"{parent.v('أعطى', 'أعطت')} {parent.name} {hero.name} وعاءً كبيرًا، {parent.v('وطلب', 'وطلبت')} من{hero.p('ه', 'ها')} أن {hero.p('يخلط', 'تخلط')} الدقيق بالماء.",
        f"{hero.v('خلط', 'خلطت')} {hero.name} بسرعة كبيرة، فطار الدقيق في كل مكان!",
        t.say(hero, "يا إلهي! لقد صار المطبخ أبيض، وصار وجهي أبيض أيضًا!", ("صاح", "صاحت")),
        f"{parent.v('ضحك', 'ضحكت')} {parent.name} كثيرًا.",
        t.say(
            parent,
            f"لا بأس يا صغير{hero.p('ي', 'تي')}. {hero.p('اخلط', 'اخلطي')} ببطء، وسننظف معًا بعد ذلك.",
        ),
        f"{hero.v('خلط', 'خلطت')} {hero.name} ببطء هذه المرة، ودخل الوعاء إلى الفرن.",
        f"بعد قليل، {friend.v('جاء', 'جاءت')} {friend.name} {friend.v('وشم', 'وشمت')} رائحة طيبة.",
        t.say(friend, "ما هذه الرائحة الجميلة؟", ("سأل", "سألت")),
        t.say(hero, f"لقد صنعنا {dish}! {friend.p('تعال', 'تعالي')} نأكل معًا."),
    ]


PLOTS: list[Callable] = [
    _plot_lost,
    _plot_animal,
    _plot_try,
    _plot_share,
    _plot_fear,
    _plot_gift,
    _plot_rain,
    _plot_cook,
]


def _ending(r: random.Random, hero: _Char, friend: _Char, moral: str) -> list[str]:
    happy = g(r.choice(FEELINGS), hero.gender)
    return [
        r.choice([
            f"ومنذ ذلك اليوم، {hero.v('أصبح', 'أصبحت')} {hero.name} و{friend.name} {'صديقتين لا تفترقان' if hero.gender == friend.gender == 'f' else 'صديقين لا يفترقان'}.",
            f"{hero.v('عاد', 'عادت')} {hero.name} إلى البيت {happy}.",
            f"في تلك الليلة، {hero.v('نام', 'نامت')} {hero.name} {happy} وهو يبتسم." if hero.gender == "m" else f"في تلك الليلة، نامت {hero.name} {happy} وهي تبتسم.",
        ]),
        f"{hero.v('تعلم', 'تعلمت')} {hero.name} {moral}.",
    ]  # fmt: skip


def _check_share(style: Style, english_name_share: float) -> None:
    """The share is a probability, and only the translated style has English names to share."""
    if not 0.0 <= english_name_share <= 1.0:  # NaN fails too
        raise ValueError(f"english_name_share={english_name_share} must be in [0, 1]")
    if style == "native" and english_name_share != 1.0:
        raise ValueError(
            f"english_name_share={english_name_share} applies to the translated style only: "
            "native stories have Arabic names"
        )


def _two_names(names: list, genders: list[str], rng: random.Random) -> list[tuple[str, str]]:
    """Hero and friend of the given genders from `names`, never the same name twice."""
    hero, friend = rng.sample([n for n in names if n[1] == genders[0]], 2)
    if genders[1] != genders[0]:
        friend = rng.choice([n for n in names if n[1] == genders[1]])
    return [hero, friend]


def _cast(
    style: Style, index: int, seed: int, genders: list[str], english_name_share: float
) -> tuple[_Char, _Char]:
    """The two characters. Below share 1.0 each one independently keeps its English name with
    probability `english_name_share`, else takes the Arabic name the `native` story gives it (the
    same names stream over the other list); the choice has a stream of its own, so nothing else
    in the story moves. Names from both lists never coincide (ليلي is not ليلى): two
    characters from different lists differ too."""

    def names(of: list) -> list[tuple[str, str]]:  # every list from the same names stream
        return _two_names(of, genders, random.Random(f"{seed}:{index}:names"))

    pair = names(ARABIC_NAMES if style == "native" else ENGLISH_NAMES_AR)
    if style == "translated" and english_name_share < 1.0:
        origin = random.Random(f"{seed}:{index}:origin")
        arabic = names(ARABIC_NAMES)
        pair = [e if origin.random() < english_name_share else a
                for e, a in zip(pair, arabic, strict=True)]  # fmt: skip
    return _Char(*pair[0]), _Char(*pair[1])


def story(style: Style, index: int, seed: int, english_name_share: float = 1.0) -> str:
    """Story number `index` of `style` for `seed`; same plot for both styles. With `translated`,
    `english_name_share` is each character's chance of an English name (else an Arabic one)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}: choose one of {STYLES}")
    _check_share(style, english_name_share)
    plot_rng = random.Random(f"{seed}:{index}:plot")
    # Genders come from the plot stream, names from the style's list: both styles tell one tale.
    genders = [plot_rng.choice("mf"), plot_rng.choice("mf")]
    hero, friend = _cast(style, index, seed, genders, english_name_share)
    teller = _Teller(style, random.Random(f"{seed}:{index}:dialogue"))
    plot = plot_rng.choice(PLOTS)
    paras = [_opening(plot_rng, hero, friend), plot(plot_rng, teller, hero, friend)]
    moral = plot_rng.choice(MORALS[plot.__name__.removeprefix("_plot_")])
    paras.append(_ending(plot_rng, hero, friend, moral))
    body = paras[1]
    cut = len(body) // 2
    return "\n\n".join(" ".join(p) for p in [paras[0], body[:cut], body[cut:], paras[2]])


def generate(style: Style, n: int, seed: int, english_name_share: float = 1.0) -> list[str]:
    """`n` deterministic stories of `style` (`english_name_share`: see `story`)."""
    _check_share(style, english_name_share)
    return [story(style, i, seed, english_name_share) for i in range(n)]
