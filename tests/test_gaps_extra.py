"""Bad rows in files given as bare paths (`dpo.pairs`, `simpo.pairs`, `annotate.pairs`): the error names file, row
and field, and its advice is one the user can follow there (no `skip_bad_rows`, which only dataset specs take)."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_experiment, write_yaml
from prefopt.annotate.items import load_pair_file
from prefopt.data.errors import DataError
from prefopt.preference.data import load_pairs

ROWS = [{"prompt": "Sort 3 1 2", "chosen": "1 2 3", "rejected": "3 2 1"},
        {"prompt": "Sort 5 4", "chosen": "", "rejected": "5 4"}]


def _user_pairs(path):
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_dpo_pairs_file_row_error_gives_advice_for_a_pairs_file(tmp_path):
    path = _user_pairs(tmp_path / "my_pairs.jsonl")
    with pytest.raises(DataError) as e:
        load_pairs(str(path), "alpaca", None)
    assert (e.value.path, e.value.row, e.value.field) == (str(path), 2, "chosen")
    assert str(e.value) == (f"{path}, row 2, field 'chosen': empty; fix or remove this row: a dpo / simpo `pairs` "
                            "file is read as it is, bad rows are not skipped (the pairs stage writes files that "
                            "read cleanly)")
    assert "skip_bad_rows" not in str(e.value) and "\n" not in str(e.value)


def test_a_missing_pairs_file_keeps_its_own_message(tmp_path):
    with pytest.raises(DataError) as e:
        load_pairs(str(tmp_path / "absent.jsonl"), "alpaca", None)
    assert "not found" in str(e.value) and "fix or remove this row" not in str(e.value)


def test_annotate_pairs_file_row_error_gives_advice_for_the_page(tmp_path):
    path = tmp_path / "serve.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(DataError) as e:
        load_pair_file(path)
    assert str(e.value) == (f"{path}, row 2, field 'rejected': missing; fix or remove this row: the page serves the "
                            "file as it is, bad rows are not skipped")


def test_dpo_cli_with_a_bad_user_pairs_file_is_one_line(tmp_path, tiny_model_dir, capsys):
    """`prefopt dpo CONFIG --dpo.pairs=FILE` as a user runs it: exit code 3 and the one line above."""
    from prefopt.cli import main

    path = _user_pairs(tmp_path / "my_pairs.jsonl")
    exp = write_yaml(tmp_path / "e.yaml", tiny_experiment(tmp_path, stages=["dpo"], wandb={"mode": "disabled"},
                                                          dpo={"model": str(tiny_model_dir), "pairs": str(path)}))
    assert main(["dpo", str(exp)]) == 3
    err = capsys.readouterr().err
    assert err == (f"prefopt: data error: {path}, row 2, field 'chosen': empty; fix or remove this row: a dpo / "
                   "simpo `pairs` file is read as it is, bad rows are not skipped (the pairs stage writes files "
                   "that read cleanly)\n")
