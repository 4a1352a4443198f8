"""The random-key streams of a run, in one table.

Every random draw of a run comes from `config.seed` through `experiment.run_keys(config)`:
`split(PRNGKey(seed), 4)` = (init, train steps, snapshot / evaluation samples, evaluation),
then `fold_in` with a step or batch index and, where one base key serves several purposes,
with a stream id below. The values are part of what makes a run reproducible: a changed id
changes every later sample of an existing run.
"""

# --- inside the compiled programs ----------------------------------------------------------
# make_sample_fn: x_T = sde.prior_sampling(fold_in(key, PRIOR)); the sampler's own noise
# from fold_in(key, SAMPLER). So every method starts from the same x_T for the same key.
PRIOR = 0
SAMPLER = 1
# make_train_step: the step key fold_in(base, step) is split into (loss, dropout); labels
# dropped for classifier-free guidance with fold_in(step key, LABEL_DROPOUT).
LABEL_DROPOUT = 2

# --- on the host, per batch ---------------------------------------------------------------
# evaluate / sample: batch i of samples is drawn with fold_in(fold_in(sample key,
# SAMPLE_BATCHES), i), the same for every method and guidance setting.
SAMPLE_BATCHES = 1 << 30
# guided.complete_test_images: inpainting / colorization of test images.
COMPLETION = 1 << 29
# evaluate: bits/dim of test batch i with fold_in(eval key, BPD_BATCHES | i) (the test loss
# uses fold_in(eval key, i)).
BPD_BATCHES = 1 << 20
# classifier training: (init, steps) = split(fold_in(PRNGKey(seed), CLASSIFIER)).
CLASSIFIER = 17
