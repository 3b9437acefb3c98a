"""ViT-Linearizer's distillation (method.md §2-4) and what serves it.

distill.py        the method: the teacher's targets, the distillation step, the stage
losses.py         activation matching and masked prediction
teacher_cache.py  the teacher's targets kept on disk, so epochs skip its forward
teacher_init.py   a teacher-shaped student built from the teacher's weights
scorecard.py      how close the student's representation is to the teacher's
"""
