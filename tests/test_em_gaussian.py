"""EM against a Gaussian known answer (tests/gaussian_model.py, ``GaussianEM``): the M-step of a Gaussian prior
is a covariance fit, so what each E-step sampler does to EM is measured without any network.

From a start that has the right smoothness but no dark background (``prior_covariance(background=1)``, the
defect of our ambient priors' samples), EM with exact posterior samples moves the prior to the truth; with the
DC sampler as E-step it also improves the prior, round after round, but stops further from the truth
(docs/theory.md, "EM against a Gaussian known answer", has the numbers for 5 rounds and MMPS). The thresholds
are about 1.3 times the measured gaps.
"""

import pytest

from tests.gaussian_model import GaussianEM, prior_covariance

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def em():
    return GaussianEM(per=96)


def test_exact_e_steps_move_the_prior_to_the_truth(em):
    rounds = em.run(prior_covariance(em.truth.N, background=1.0), "exact", 3)
    mse = [r["mse"] for r in rounds]
    assert mse[0] > 2.5  # the start is far from Bayes
    assert mse[1] < mse[0] and mse[3] < mse[1]
    assert mse[3] < 1.6  # measured 1.27 (Bayes: 1)
    assert all(0.9 < r["trace"] < 1.1 for r in rounds)


def test_dc_e_steps_improve_the_prior_but_stop_short_of_exact(em):
    start = prior_covariance(em.truth.N, background=1.0)
    exact = em.run(start, "exact", 3)
    dc = em.run(start, ("dc", {}), 3)
    assert dc[3]["mse"] < 0.6 * dc[0]["mse"]  # measured 0.41; EM with DC samples does not diverge on a Gaussian prior
    assert all(0.85 < r["trace"] < 1.15 for r in dc)  # and does not inflate it
    # but stops further from the truth: measured 1.43 vs 1.27 (1.55 with 5 CG steps)
    assert dc[3]["mse"] > exact[3]["mse"] + 0.12
