"""read_json_object: one line naming the file (or the given prefix) for every kind of bad JSON file."""

import pytest

from olavlm.errors import ConfigError, read_json_object


@pytest.mark.parametrize("text,message", [("{", "not readable JSON"), ("[1, 2]", "expected a JSON object, got list"),
                                          ("\xff\xfe", "not readable JSON")])
def test_bad_files_raise_the_given_error_with_one_line(tmp_path, text, message):
    file = tmp_path / "x.json"
    file.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError, match=message) as info:
        read_json_object(file, ConfigError, "train.deepspeed: x.json")
    assert str(info.value).startswith("train.deepspeed: x.json: ") and "\n" not in str(info.value)


def test_missing_file_names_the_path_and_a_good_file_parses(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'none.json'}: not readable JSON"):
        read_json_object(tmp_path / "none.json", ConfigError)
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert read_json_object(tmp_path / "ok.json", ConfigError) == {"a": 1}
