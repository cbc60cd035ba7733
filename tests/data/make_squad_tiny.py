"""Writes squad_tiny.json (SQuAD v1.1 layout) and squad_tiny_v2.json (with
unanswerable questions) next to this file.

The paragraphs were written for these tests from well-known facts of geography and
science; every ``answer_start`` is computed here by locating the answer text in its
context (the ``occurrence``-th match, first by default), so the files cannot drift from
their texts. The Amazon paragraph is longer than 200 tokens, so that a question on it
yields several overlapping windows at the test lengths.

Run ``python tests/data/make_squad_tiny.py`` to regenerate both files.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (title, context, [(question, answer texts or [] for unanswerable)])
ARTICLES: list[tuple[str, str, list[tuple[str, list[str]]]]] = [
    ("Mount_Everest",
     "Mount Everest, known in Nepali as Sagarmatha and in Tibetan as Chomolungma, is the "
     "highest mountain on Earth above sea level. It stands in the Mahalangur range of the "
     "Himalayas, on the border between Nepal and the Tibet Autonomous Region of China. A "
     "survey announced in 2020 put its height at 8,848.86 metres. The mountain was named "
     "after George Everest, a British surveyor general of India. Edmund Hillary of New "
     "Zealand and Tenzing Norgay, a Sherpa climber from Nepal, made the first confirmed "
     "ascent to the summit on 29 May 1953.",
     [("What is the highest mountain on Earth above sea level?", ["Mount Everest"]),
      ("In which mountain range does Mount Everest stand?", ["the Himalayas", "Himalayas"]),
      ("What is the Nepali name of Mount Everest?", ["Sagarmatha"]),
      ("What height did the 2020 survey give for the mountain?", ["8,848.86 metres"]),
      ("After whom was the mountain named?", ["George Everest"]),
      ("Who climbed to the summit together with Tenzing Norgay?", ["Edmund Hillary"]),
      ("On what date was the first confirmed ascent made?", ["29 May 1953"]),
      ("How many climbers reached the summit in 2019?", [])]),
    ("Nile",
     "The Nile is a major river of northeastern Africa that flows north into the "
     "Mediterranean Sea. With a length of about 6,650 kilometres it has long been regarded "
     "as the longest river in the world, although some measurements give that title to "
     "the Amazon. The river has two main tributaries: the White Nile, which rises in the "
     "region of the Great Lakes, and the Blue Nile, which begins at Lake Tana in Ethiopia. "
     "The two meet near Khartoum, the capital of Sudan. In Egypt the Aswan High Dam, "
     "completed in 1970, holds back the water of Lake Nasser and controls the annual "
     "flood.",
     [("Into which sea does the Nile flow?", ["the Mediterranean Sea", "Mediterranean Sea"]),
      ("How long is the Nile?", ["about 6,650 kilometres", "6,650 kilometres"]),
      ("Which river is sometimes said to be longer than the Nile?", ["the Amazon"]),
      ("Where does the Blue Nile begin?", ["Lake Tana"]),
      ("Near which city do the White Nile and the Blue Nile meet?", ["Khartoum"]),
      ("When was the Aswan High Dam completed?", ["1970"]),
      ("What lake lies behind the Aswan High Dam?", ["Lake Nasser"]),
      ("How many people live in Khartoum?", [])]),
    ("Photosynthesis",
     "Photosynthesis is the process by which plants, algae and cyanobacteria turn light "
     "energy into chemical energy. In plants it takes place in chloroplasts, whose green "
     "pigment chlorophyll absorbs mostly red and blue light. Using that energy, the cell "
     "combines carbon dioxide and water into glucose and releases oxygen as a by-product. "
     "The light-dependent reactions happen in the thylakoid membranes, while the Calvin "
     "cycle, which fixes carbon, runs in the stroma. Almost all of the oxygen in the "
     "atmosphere of the Earth was produced by photosynthesis.",
     [("What does photosynthesis turn light energy into?", ["chemical energy"]),
      ("In which organelles does photosynthesis take place in plants?", ["chloroplasts"]),
      ("Which green pigment absorbs the light?", ["chlorophyll"]),
      ("Which colours of light does chlorophyll mostly absorb?", ["red and blue"]),
      ("Which gas is released as a by-product?", ["oxygen"]),
      ("Where do the light-dependent reactions happen?", ["the thylakoid membranes"]),
      ("Which cycle fixes carbon in the stroma?", ["the Calvin cycle", "Calvin cycle"]),
      ("Which scientist first described the Calvin cycle?", [])]),
    ("Water",
     "Water is a chemical compound whose molecule consists of two hydrogen atoms bonded "
     "to one oxygen atom, giving the formula H2O. At standard atmospheric pressure it "
     "freezes at 0 degrees Celsius and boils at 100 degrees Celsius. Unusually, its solid "
     "form is less dense than the liquid, which is why ice floats on lakes and oceans. "
     "About 71 percent of the surface of the Earth is covered by water, and nearly all of "
     "it is salt water in the oceans.",
     [("How many hydrogen atoms does a water molecule contain?", ["two"]),
      ("What is the chemical formula of water?", ["H2O"]),
      ("At what temperature does water boil at standard pressure?",
       ["100 degrees Celsius"]),
      ("At what temperature does water freeze?", ["0 degrees Celsius"]),
      ("What floats on lakes and oceans?", ["ice"]),
      ("How much of the surface of the Earth is covered by water?",
       ["About 71 percent", "71 percent"]),
      ("What is the density of sea water?", [])]),
    ("Solar_System",
     "The Solar System consists of the Sun and the objects bound to it by gravity, "
     "including eight planets. Mercury is the planet closest to the Sun, and Jupiter is "
     "the largest, with a mass more than twice that of all the other planets combined. "
     "Saturn is best known for its bright system of rings. The Earth is the third planet "
     "from the Sun, and sunlight takes about eight minutes to reach it. In 2006 the "
     "International Astronomical Union reclassified Pluto as a dwarf planet.",
     [("How many planets does the Solar System include?", ["eight"]),
      ("Which planet is closest to the Sun?", ["Mercury"]),
      ("Which planet is the largest?", ["Jupiter"]),
      ("Which planet is best known for its rings?", ["Saturn"]),
      ("How long does sunlight take to reach the Earth?", ["about eight minutes"]),
      ("Which body reclassified Pluto as a dwarf planet?",
       ["the International Astronomical Union", "International Astronomical Union"]),
      ("In what year was Pluto reclassified?", ["2006"]),
      ("How many moons does Saturn have?", [])]),
    ("DNA",
     "Deoxyribonucleic acid, or DNA, is the molecule that carries the genetic "
     "instructions of all known living organisms. Its structure is a double helix of two "
     "strands wound around each other, described in 1953 by James Watson and Francis "
     "Crick using X-ray images produced by Rosalind Franklin. Each strand is built from "
     "four kinds of nucleotide bases: adenine, thymine, guanine and cytosine. Adenine "
     "pairs with thymine and guanine pairs with cytosine. In the cells of plants and "
     "animals most DNA is stored in the nucleus.",
     [("What does DNA stand for?", ["Deoxyribonucleic acid"]),
      ("What is the shape of the DNA molecule?", ["a double helix", "double helix"]),
      ("In what year was the structure of DNA described?", ["1953"]),
      ("Whose X-ray images did Watson and Crick use?", ["Rosalind Franklin"]),
      ("Which base pairs with thymine?", ["Adenine"]),
      ("Where is most DNA stored in the cells of plants and animals?", ["the nucleus"]),
      ("How many genes does the human genome contain?", [])]),
    ("Amazon_rainforest",
     "The Amazon rainforest covers most of the Amazon basin of South America, an area of "
     "about seven million square kilometres of which some 5.5 million are covered by "
     "forest. The region includes territory belonging to nine nations; the majority of "
     "the forest lies in Brazil, with Peru holding the second largest share and Colombia "
     "the third. The Amazon River, which drains the basin, carries more water than any "
     "other river on Earth and discharges it into the Atlantic Ocean. The forest is home "
     "to an estimated 390 billion individual trees divided into some 16,000 species, and "
     "it contains around one in ten of the known species on the planet. Because its "
     "trees store vast amounts of carbon, the rainforest plays an important role in "
     "regulating the global climate. Large parts of it have been cleared since the "
     "1970s, mainly to create pasture for cattle and fields for soybeans, and scientists "
     "warn that further deforestation could turn parts of the forest into dry savanna. "
     "The first European to travel the length of the Amazon River was the Spanish "
     "explorer Francisco de Orellana, who reached its mouth in 1542.",
     [("On which continent is the Amazon rainforest?", ["South America"]),
      ("Which country holds the majority of the forest?", ["Brazil"]),
      ("Which country has the second largest share of the forest?", ["Peru"]),
      ("Into which ocean does the Amazon River discharge its water?",
       ["the Atlantic Ocean", "Atlantic Ocean"]),
      ("How many individual trees grow in the forest?", ["390 billion"]),
      ("How many tree species does the forest hold?", ["some 16,000 species", "16,000"]),
      ("What is the land mainly cleared for?",
       ["pasture for cattle and fields for soybeans"]),
      ("What could further deforestation turn parts of the forest into?",
       ["dry savanna"]),
      ("Who was the first European to travel the length of the Amazon River?",
       ["Francisco de Orellana"]),
      ("In what year did Orellana reach the mouth of the river?", ["1542"]),
      ("How much rain falls on the Amazon basin each year?", [])]),
    ("Speed_of_light",
     "Light travels through a vacuum at exactly 299,792,458 metres per second, a value "
     "fixed by the definition of the metre since 1983. According to the theory of "
     "special relativity that Albert Einstein published in 1905, nothing carrying "
     "information can travel faster than this speed. Light from the Moon reaches the "
     "Earth in a little more than one second. In materials such as water or glass light "
     "moves more slowly, and the ratio of its speed in a vacuum to its speed in a "
     "material is called the refractive index.",
     [("How fast does light travel in a vacuum?", ["299,792,458 metres per second"]),
      ("Since what year has the speed of light fixed the metre?", ["1983"]),
      ("Who published the theory of special relativity?", ["Albert Einstein"]),
      ("When was the theory of special relativity published?", ["1905"]),
      ("How long does light from the Moon take to reach the Earth?",
       ["a little more than one second"]),
      ("What is the ratio of the speed of light in a vacuum to its speed in a material "
       "called?", ["the refractive index", "refractive index"])]),
]


def build(with_negative: bool) -> dict:
    """The SQuAD-layout document (v2 keeps the unanswerable questions)."""
    data = []
    for title, context, questions in ARTICLES:
        qas = []
        for i, (question, texts) in enumerate(questions):
            if not texts and not with_negative:
                continue
            answers = []
            for text in texts:
                start = context.find(text)
                assert start >= 0, f"{title}: {text!r} is not in the context"
                assert context[start:start + len(text)] == text
                answers.append({"text": text, "answer_start": start})
            qa = {"id": f"{title.lower()}-{i}", "question": question, "answers": answers}
            if with_negative:
                qa["is_impossible"] = not texts
            qas.append(qa)
        data.append({"title": title, "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "v2.0" if with_negative else "v1.1", "data": data}


def main() -> None:
    for name, neg in (("squad_tiny.json", False), ("squad_tiny_v2.json", True)):
        doc = build(neg)
        (HERE / name).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        n = sum(len(p["qas"]) for a in doc["data"] for p in a["paragraphs"])
        print(f"{name}: {n} questions")


if __name__ == "__main__":
    main()
