"""ViT-Linearizer's distillation (method.md §2-4) and what serves it.

distill.py        the method: the teacher's targets, the losses of one batch, the step
losses.py         activation matching and masked prediction
stage.py          the distill stage: its checks, the starting student, the cache, the loop
student_init.py   the student distillation starts from (`distill.student_init`)
teacher_fit.py    whether a student can take the teacher's weights (from the configs)
teacher_init.py   the copy of the teacher's weights into a teacher-shaped student
teacher_cache.py  the teacher's targets kept on disk, so epochs skip its forward
cache_views.py    the cache's rows: which example and view each holds
cache_files.py    the cache's arrays and fingerprints on disk
scorecard.py      how close the student's representation is to the teacher's
"""
