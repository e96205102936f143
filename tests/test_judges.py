"""The offline judges: real classifiers from other packages, scored on real sentences."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest

from probe_dpo import judges
from probe_dpo.errors import UserError

TOXIC = [
    "You are a fucking idiot and I hate you.",
    "Shut up, you stupid bitch.",
    "Go fuck yourself, you worthless piece of shit.",
]
BENIGN = [
    "The weather today is sunny with a light breeze.",
    "She baked bread for her neighbours on Sunday morning.",
    "The committee will meet on Tuesday to discuss the library budget.",
]


@pytest.mark.parametrize("name", judges.EVAL_JUDGES)
def test_real_scores_separate_toxic_from_benign(name):
    judge = judges.get_judge(name)
    assert judge.name == name
    scores = judge.score(TOXIC + BENIGN)
    assert isinstance(scores, np.ndarray) and scores.shape == (6,)
    assert np.all((scores >= 0) & (scores <= 1))
    toxic, benign = scores[:3], scores[3:]
    assert np.all(toxic > 0.5), scores
    assert np.all(benign < 0.5), scores
    assert toxic.min() > benign.max()


@pytest.mark.parametrize("name", judges.EVAL_JUDGES)
def test_batches_empty_and_order(name):
    judge = judges.get_judge(name)
    assert judge.score([]).shape == (0,)
    texts = (TOXIC + BENIGN) * 300  # several internal batches for the BiLSTM (batch 512)
    many = judge.score(texts)
    assert many.shape == (len(texts),)
    np.testing.assert_allclose(many[:6], judge.score(TOXIC + BENIGN), atol=1e-5)
    np.testing.assert_allclose(many[-6:], many[:6], atol=1e-5)
    with pytest.raises(TypeError):
        judge.score("one string is not a batch")


def test_toxic_comment_classifier_uses_torch_backend_and_six_outputs():
    judge = judges.ToxicCommentClassifier()
    out = judge.scores_all(TOXIC[:1])
    assert out.shape == (1, 6)
    import keras

    assert keras.backend.backend() == "torch"
    assert os.environ.get("KERAS_BACKEND") == "torch"
    assert judge.score(TOXIC[:1])[0] == pytest.approx(out[0, 0])  # score = the "toxic" column


def test_unknown_judge_names_the_valid_ones():
    with pytest.raises(UserError) as err:
        judges.get_judge("perspective")
    msg = str(err.value)
    assert "perspective" in msg
    for name in judges.JUDGE_NAMES:
        assert name in msg


def test_tokenizer_unpickler_refuses_anything_but_the_tokenizer():
    evil = pickle.dumps(os.system)  # a reference to os.system: must never be resolved
    with pytest.raises(pickle.UnpicklingError, match="os|posix"):
        judges._TokenizerUnpickler(io.BytesIO(evil)).load()
    with pytest.raises(pickle.UnpicklingError, match="eval"):
        judges._TokenizerUnpickler(io.BytesIO(pickle.dumps(eval))).load()
    ok = judges._TokenizerUnpickler(io.BytesIO(pickle.dumps({"a": [1, 2.0, "x"]}))).load()
    assert ok == {"a": [1, 2.0, "x"]}


def test_package_dir_does_not_import_and_names_missing_packages():
    assert (judges.package_dir("toxic_classifier") / "model" / "model.weights.h5").is_file()
    with pytest.raises(UserError, match="no_such_pkg_xyz"):
        judges.package_dir("no_such_pkg_xyz")
