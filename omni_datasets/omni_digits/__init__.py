"""omni-digits: a small real omni dataset (handwritten digits, spoken digits, digit videos,
drawing prompts and Shakespeare text), registered as `data.dataset: omni_digits` when this
module is listed in `data.plugins`.

    build.py         the dataset files (scikit-learn digits + espeak-ng speech), cached
    vq_tokenizer.py  the prepare step: the image_vq decoder's VQ tokenizer, named as its init_from
    source.py        the DataSource: five tasks interleaved, packed into full rows
    make.py          python -m omni_datasets.omni_digits.make     (build and report)
    evaluate.py      python -m omni_datasets.omni_digits.evaluate OUTPUT_DIR   (held-out scores)
"""

from .source import OmniDigitsData, build_omni_digits  # noqa: F401  (registers omni_digits)
