/* An unarmed UD2 in an L2 user program: must still die of SIGILL (exit status 132 in sh). */
int main(void)
{
	__asm__ volatile("ud2");
	return 0;
}
