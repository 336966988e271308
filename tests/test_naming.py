"""Output file naming rules and the collision table."""

from __future__ import annotations

from mlimages_jax.acquire import image_list
from mlimages_jax.acquire import naming


def test_name_from_url_rule_and_sanitising():
  assert naming.name_from_url(
      "https://farm2.staticflickr.com/2034/1557324960_1ae893fed8_o.jpg"
  ) == "2034_1557324960_1ae893fed8_o.jpg"
  assert naming.name_from_url("http://h.org/x.jpg") == "h.org_x.jpg"
  for url in ["http://h/a/..%2F..%2Fetc%2Fpasswd", "http://h/../../x/..",
              "http://h/a/b/../../../../etc/passwd", "http://h/a\\b/c:d.jpg",
              "http://h/.hidden/.x", "http://h/" + "a" * 400 + "/b.jpg"]:
    name = naming.name_from_url(url)
    assert "/" not in name and "\\" not in name and ".." not in name, name
    assert name and not name.startswith(".") and len(name.encode()) <= 200
  assert naming.name_from_file_name("n01440764/n01440764_10026.JPEG") == (
      "n01440764_10026.JPEG")


def test_name_collisions_resolved_deterministically(tmp_path):
  lines = ["http://a/f/x.jpg 1", "http://b/f/x.jpg 2", "http://c/f/X.JPG 3",
           "http://d/g/y.jpg 4", "http://e/f/x.jpg 5", "http://z/f/x_1.jpg 6"]
  path = tmp_path / "l.txt"
  path.write_text("\n".join(lines) + "\n")
  reader = image_list.ListReader(str(path))
  table = naming.build_name_table(reader, naming.name_from_url)
  names = [table.name(item) for item in reader]
  # x_1.jpg exists literally, so the second x.jpg skips to _2; the check is
  # case-insensitive (X.JPG collides with x.jpg).
  assert names == ["f_x.jpg", "f_x_2.jpg", "f_X_3.JPG", "g_y.jpg",
                   "f_x_4.jpg", "f_x_1.jpg"]
  assert len({n.casefold() for n in names}) == len(names)
