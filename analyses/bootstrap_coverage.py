"""Coverage of mechlora's bootstrap intervals on simulated data (numbers quoted in docs/metrics.md).

Part 1, questions only (`stats.bootstrap_ci`): n questions with normal means; how often the
nominal 95% interval holds the true mean, for n = 2 ... 20. This is why intervals need at
least `stats.MIN_CLUSTERS` questions.

Part 2, seeds x questions (`stats.crossed_bootstrap`): d[s, q] = mu + a_s + b_q + e_sq with a
seed effect a, a question effect b and their interaction e (normal, standard deviations given
below). Coverage of the crossed interval, of a questions-only interval that ignores the seeds,
and the rejection rate at 0.05 of the crossed p-value and of the sign-flip test over seeds when
mu = 0; the power of each when mu = 0.5. With a question effect, mu = 0 is a null over the
population of questions, not over the questions drawn: the sign-flip test over seeds holds the
questions fixed, so it "rejects" whenever these questions' mean differs from 0.

    python analyses/bootstrap_coverage.py            # a few minutes on one core
"""

from __future__ import annotations

import argparse

import numpy as np

from mechlora import stats


def questions_only(reps: int, n_boot: int) -> None:
    rng = np.random.default_rng(0)
    print("questions only: coverage of the nominal 95% interval (normal question means)")
    for n in (2, 3, 4, 5, 6, 8, 10, 20):
        hits = 0
        for r in range(reps):
            lo, hi = stats.bootstrap_ci(np.arange(n), rng.normal(size=n), n_boot=n_boot,
                                        seed=r, min_clusters=1)
            hits += lo <= 0.0 <= hi
        print(f"  {n:>2} questions: {hits / reps:.2f}")


def crossed(reps: int, n_boot: int, n_questions: int, sd: tuple[float, float, float]) -> None:
    rng = np.random.default_rng(1)
    sd_seed, sd_question, sd_cell = sd
    print(f"seeds x {n_questions} questions, sd seed {sd_seed}, question {sd_question}, "
          f"cell {sd_cell}")
    print("  seeds | cover crossed | cover questions-only | reject crossed | reject sign-flip |"
          " power crossed | power sign-flip (mu = 0.5)")
    for n_seeds in (2, 3, 5, 8, 10):
        cover = cover_q = rej = rej_sf = pow_c = pow_sf = 0
        for r in range(reps):
            base = (sd_seed * rng.normal(size=(n_seeds, 1))
                    + sd_question * rng.normal(size=(1, n_questions))
                    + sd_cell * rng.normal(size=(n_seeds, n_questions)))
            res = stats.crossed_bootstrap(base, n_boot=n_boot, seed=r)
            cover += res.ci[0] <= 0.0 <= res.ci[1]
            rej += res.p < 0.05
            lo, hi = stats.bootstrap_ci(np.tile(np.arange(n_questions), n_seeds), base.ravel(),
                                        n_boot=n_boot, seed=r)
            cover_q += lo <= 0.0 <= hi
            sf = stats.seed_sign_flip_test(base, min_seeds=1).p
            rej_sf += sf < 0.05
            pow_c += stats.crossed_bootstrap(base + 0.5, n_boot=n_boot, seed=r).p < 0.05
            pow_sf += stats.seed_sign_flip_test(base + 0.5, min_seeds=1).p < 0.05
        print(f"  {n_seeds:>5} | {cover / reps:13.2f} | {cover_q / reps:20.2f} | "
              f"{rej / reps:14.2f} | {rej_sf / reps:16.2f} | {pow_c / reps:13.2f} | "
              f"{pow_sf / reps:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=1000, help="simulated data sets per row")
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()
    questions_only(args.reps, args.n_boot)
    for sd in ((1.0, 1.0, 1.0), (0.0, 1.0, 1.0), (1.0, 0.0, 1.0)):
        crossed(args.reps // 2, args.n_boot, 100, sd)


if __name__ == "__main__":
    main()
