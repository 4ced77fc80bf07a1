# scripts/vmtest/detfile.awk — prints the deterministic file of the VM test
# (about 5.6 MB of numbered lines). The guest writes it to the ext4 file
# system on /dev/nbd0 (`awk -f detfile.awk`, busybox awk); run.sh prints it
# again on the host (mawk or gawk give the same bytes) and compares it with
# the copy it reads out of the disk file with debugfs.
BEGIN {
  for (i = 0; i < 200000; i++)
    printf "blockship %08d %08x\n", i, i * 7919
}
