"""The eleven data sets of CoOp's benchmark, one ``register`` a data set.

Folder, image folder and split-file names: CoOp's DATASETS.md and ``datasets/<name>.py``
(github.com/KaiyangZhou/CoOp); templates: ``CUSTOM_TEMPLATES`` in CoOp's ``trainers/zsclip.py``;
download links: DATASETS.md (the ``split_zhou_*.json`` files are CoOp's, on Google Drive).
"""

from __future__ import annotations

from .readers import aircraft_files, imagenet_folders, split_file
from .registry import DatasetSpec, register

_DRIVE = "https://drive.google.com/file/d/{}/view?usp=sharing"


def _split_set(name: str, folder: str, image_dir: str, split_name: str, template: str, images: dict[str, str],
               split_id: str, aliases: tuple[str, ...] = ()) -> DatasetSpec:
    split = f"split_zhou_{split_name}.json"
    return register(DatasetSpec(name=name, folder=folder, reader=split_file, template=template, image_dir=image_dir,
                                split_file=split, download={**images, split: _DRIVE.format(split_id)}, aliases=aliases))


register(DatasetSpec(
    name="ImageNet", folder="imagenet", reader=imagenet_folders, template="a photo of a {}.",
    download={"images": "https://image-net.org/index.php (train and val extracted to imagenet/images/{train,val})",
              "classnames.txt": _DRIVE.format("1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF")},
))
_split_set("SUN397", "sun397", "SUN397", "SUN397", "a photo of a {}.",
           {"SUN397": "http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz"}, "1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq")
_split_set("Caltech101", "caltech-101", "101_ObjectCategories", "Caltech101", "a photo of a {}.",
           {"101_ObjectCategories": "http://www.vision.caltech.edu/Image_Datasets/Caltech101/101_ObjectCategories.tar.gz"},
           "1hyarUivQE36mY6jSomru6Fjd-JzwcCzN")
_split_set("OxfordPets", "oxford_pets", "images", "OxfordPets", "a photo of a {}, a type of pet.",
           {"images": "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz"}, "1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs")
# StanfordCars' split paths start at the data set folder (cars_train/..., cars_test/...), not at an image folder
_split_set("StanfordCars", "stanford_cars", "", "StanfordCars", "a photo of a {}.",
           {"cars_train": "http://ai.stanford.edu/~jkrause/car196/cars_train.tgz",
            "cars_test": "http://ai.stanford.edu/~jkrause/car196/cars_test.tgz"}, "1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT")
_split_set("Food101", "food-101", "images", "Food101", "a photo of {}, a type of food.",
           {"images": "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/ (food-101.tar.gz)"},
           "1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl")
_split_set("DTD", "dtd", "images", "DescribableTextures", "{} texture.",
           {"images": "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"},
           "1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x", aliases=("DescribableTextures",))
_split_set("EuroSAT", "eurosat", "2750", "EuroSAT", "a centered satellite photo of {}.",
           {"2750": "http://madm.dfki.de/files/sentinel/EuroSAT.zip"}, "1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o")
_split_set("UCF101", "ucf101", "UCF-101-midframes", "UCF101", "a photo of a person doing {}.",
           {"UCF-101-midframes": _DRIVE.format("10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O") + " (UCF-101-midframes.zip)"},
           "1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y")
_split_set("Flowers102", "oxford_flowers", "jpg", "OxfordFlowers", "a photo of a {}, a type of flower.",
           {"jpg": "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz"},
           "1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT", aliases=("OxfordFlowers",))
register(DatasetSpec(
    name="FGVCAircraft", folder="fgvc_aircraft", reader=aircraft_files, template="a photo of a {}, a type of aircraft.",
    download={"images": "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz "
              "(its data/ folder, renamed fgvc_aircraft/)"},
    aliases=("Aircraft",),
))
