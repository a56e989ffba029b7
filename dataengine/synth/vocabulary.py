"""Word lists and places the synthetic corpus draws its metadata from.

Some entries have spaces, commas, quotes or non-ASCII characters on purpose: metadata readers must survive them.
"""

from __future__ import annotations

SCANNER_DEVICE = "Canon CanoScan LiDE 100"
"""The capture device of the ``drawing`` class (a flatbed scanner); no user camera is a scanner."""

# Class order is also the size rank (the first class is the largest). "drawing" sits early so that it keeps
# enough photos in small corpora.
CLASS_NAMES = (
    "disc", "stripes", "checkerboard", "ring", "drawing", "triangle", "cross", "dots",
    "waves", "grid", "star", "crescent", "target", "frame", "zigzag", "square",
)
# Per-class tag vocabularies, most frequent first (Zipf weights by rank). Some tags have spaces or non-ASCII
# characters on purpose; a few overlap between classes ("pattern", "moon", "night"), as real tags do.
CLASS_TAGS = {
    "disc": ("circle", "disc", "round", "ball", "sun", "orb", "dot", "moon", "círculo", "full moon"),
    "stripes": ("stripes", "lines", "striped", "pattern", "horizontal", "fabric", "blinds", "rayures", "pin stripe"),
    "checkerboard": (
        "checkerboard", "checkered", "chess", "tiles", "squares", "floor", "pattern", "damier", "chess board",
    ),
    "ring": ("ring", "donut", "hoop", "loop", "wheel", "tire", "bagel", "o-ring", "life buoy"),
    "drawing": ("drawing", "sketch", "pencil", "doodle", "art", "illustration", "ink", "scan", "dessin", "line art"),
    "triangle": ("triangle", "pyramid", "warning", "delta", "geometry", "peak", "yield", "dreieck", "road sign"),
    "cross": ("cross", "plus", "intersection", "swiss", "medical", "crossing", "sign", "kreuz", "red cross"),
    "dots": ("dots", "polka", "spots", "dotted", "leds", "pattern", "bubbles", "pois", "polka dots"),
    "waves": ("waves", "wavy", "water", "ripples", "sea", "curves", "flow", "ocean", "vagues", "sound waves"),
    "grid": ("grid", "mesh", "fence", "net", "wire", "lattice", "graph paper", "grille", "chain link"),
    "star": ("star", "stars", "starfish", "christmas", "shine", "sheriff", "sparkle", "étoile", "shooting star"),
    "crescent": ("crescent", "moon", "croissant", "arc", "night", "lunar", "half moon", "mond", "new moon"),
    "target": ("target", "bullseye", "archery", "concentric", "dartboard", "aim", "cible", "bull's eye"),
    "frame": ("frame", "border", "window", "box", "outline", "picture frame", "cadre", "rahmen"),
    "zigzag": ("zigzag", "chevron", "lightning", "saw", "teeth", "herringbone", "zick zack", "zig-zag"),
    "square": ("square", "block", "cube", "tile", "diamond", "quadrat", "carré", "sticky note"),
}
NOISE_TAGS = (
    "2008", "vacation", "canon", "travel", "2009", "family", "nikon", "friends", "summer", "2007", "party",
    "me", "nature", "holiday", "iphone", "new york", "trip", "2010", "café", "東京", "rock & roll", "köln",
    "hello, world", "50% off",
)
LANDMARK_NAMES = (
    "old lighthouse", "grand fountain", "stone bridge", "clock tower", "temple gate", "harbour crane",
    "castle hill", "golden statue", "tour de l'horloge", "alte brücke",
)
CITIES = (  # (name, latitude, longitude)
    ("paris", 48.8566, 2.3522), ("new york", 40.7128, -74.006), ("london", 51.5074, -0.1278),
    ("tokyo", 35.6762, 139.6503), ("sydney", -33.8688, 151.2093), ("são paulo", -23.5505, -46.6333),
    ("berlin", 52.52, 13.405), ("san francisco", 37.7749, -122.4194), ("toronto", 43.6532, -79.3832),
    ("cape town", -33.9249, 18.4241), ("mumbai", 19.076, 72.8777), ("moscow", 55.7558, 37.6173),
    ("mexico city", 19.4326, -99.1332), ("buenos aires", -34.6037, -58.3816), ("rome", 41.9028, 12.4964),
    ("beijing", 39.9042, 116.4074), ("seoul", 37.5665, 126.978), ("cairo", 30.0444, 31.2357),
    ("reykjavík", 64.1466, -21.9426), ("nairobi", -1.2921, 36.8219),
)
CAMERAS = (  # one per user; never the scanner
    "Canon EOS 5D Mark II", "Canon EOS 400D Digital", "Canon PowerShot SD1000", "NIKON D90", "NIKON D700",
    "Apple iPhone 4", "Apple iPhone 3GS", "SONY DSC-W55", "Panasonic DMC-FZ8", "FUJIFILM FinePix S5600",
    "OLYMPUS IMAGING CORP. E-510", "EASTMAN KODAK COMPANY KODAK EASYSHARE C713 ZOOM DIGITAL CAMERA",
)
NICKNAMES = (
    "anna", "José García", "photo_guy", "Lumière", "mr. smith", "Анна", "山田太郎", "bob & alice", "kate",
    "the wanderer", "jürgen", "lens+light", "o'brien", "chloé", "señor foto", "50mm", "Zoë K.", "dave",
)
LICENSES = (
    ("Attribution License", "http://creativecommons.org/licenses/by/2.0/"),
    ("Attribution-ShareAlike License", "http://creativecommons.org/licenses/by-sa/2.0/"),
    ("Attribution-NoDerivs License", "http://creativecommons.org/licenses/by-nd/2.0/"),
    ("Attribution-NonCommercial License", "http://creativecommons.org/licenses/by-nc/2.0/"),
    ("Attribution-NonCommercial-ShareAlike License", "http://creativecommons.org/licenses/by-nc-sa/2.0/"),
    ("Attribution-NonCommercial-NoDerivs License", "http://creativecommons.org/licenses/by-nc-nd/2.0/"),
)
DESCRIPTIONS = (
    "Taken on a sunny afternoon.", "first line\nsecond line", 'see <a href="http://example.com/">my site</a>',
    "tab\tseparated words", "Día de campo, ¡qué bonito!", "100% unedited & straight out of camera",
    "夏の思い出", "a+b=c; 1/2 of it",
)
