"""Paper-agnostic plumbing shared by oa_trans.py, all_in_one.py and egovlp.py: config parsing, video decoding,
tokenization, metrics, distributed helpers, training helpers, pretrained weights, ablations and pictures."""
