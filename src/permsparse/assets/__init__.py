"""Small data files shipped with permsparse: the offline ViT teachers (see scripts/train_vit_teacher.py)."""
