"""Text measures against slow references."""

from dpolens.textquality import OVERUSE, overuse_warning, overused_words


def test_overused_words_match_a_slow_count():
    base = ["You are a fool.", "The game was fun", "I like the game", "so what"]
    aligned = ["The 2018 season was fun", "the 2018 model is great", "The 2018 season.", "so what"]
    got = overused_words(base, aligned, top=3)

    def share(texts, word):  # a continuation counts once however often it repeats the word
        return sum(word in t.lower().replace(".", " ").split() for t in texts) / len(texts)

    rises = sorted({w for t in aligned for w in t.lower().replace(".", " ").split() if share(base, w) < 0.1},
                   key=lambda w: (share(base, w) - share(aligned, w), w))[:3]
    assert [g["word"] for g in got] == rises == ["2018", "season", "great"]
    assert got[0] == {"word": "2018", "base_share": 0.0, "aligned_share": 0.75}
    assert "'2018' in 75% of its continuations (base 0%)" in overuse_warning(got)
    assert overused_words(base, base) == []  # nothing rose
    assert "the" not in [g["word"] for g in overused_words(base, aligned, top=10)]  # common in the base already
    small = [{"word": "x", "base_share": 0.1, "aligned_share": 0.1 + OVERUSE - 0.01}]
    assert overuse_warning(small) is None
