import os


def test_read_write(mounted):
    node, mnt, exp = mounted(1 << 20, writable=True)
    fd = os.open(mnt, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"hello", 4096) == 5
        assert node.data[4096:4101] == b"hello"
        assert os.pread(fd, 5, 4096) == b"hello"
        assert os.fstat(fd).st_size == 1 << 20
    finally:
        os.close(fd)
