"""The decoding study's transcript clean-up (benchmarks/studies/whisper_decoding.py): loops cut, speech kept."""

from benchmarks.studies.whisper_decoding import collapse_repeats, normalise


def test_a_hallucinated_loop_is_cut_to_one_occurrence():
    assert collapse_repeats("bebe bebe bebe bebe bebe") == "bebe"
    assert collapse_repeats("Follow windspoon. Follow windspoon. Follow windspoon. Follow w") == "Follow windspoon."
    assert collapse_repeats("f f f f f f f") == "f"


def test_a_loop_inside_a_sentence_keeps_what_surrounds_it():
    assert collapse_repeats("facci a come soppi soppi soppi e cota") == "facci a come soppi e cota"
    assert collapse_repeats("Punto e coso. Punto e coso. Punto e coso. Punto") == "Punto e coso."


def test_fewer_than_three_repeats_and_plain_text_are_untouched():
    for text in ("bye bye", "very very good", "grinning face with big eyes", ""):
        assert collapse_repeats(text) == text


def test_normalise_ignores_case_punctuation_and_spacing():
    assert normalise("  Strahlendes Gesicht,  mit lachenden Augen. ") == "strahlendes gesicht mit lachenden augen"
